//! Helpers shared by the integration tests that start `flexserve serve`.

use std::io::{BufRead, BufReader};
use std::process::Child;

/// The URL a `flexserve serve --port 0` child prints on its first line of
/// stdout (`listening on http://ADDR`); the child's stdout must be piped.
pub fn listening_url(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("the daemon's stdout is piped")).read_line(&mut line).unwrap();
    line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("the daemon printed {line:?}")).to_string()
}
