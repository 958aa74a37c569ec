//! Fused multiply-adds for the portable kernels, which reproduce the SIMD
//! kernels' FMAs bit for bit: the instruction where the CPU has it, an exact
//! emulation where it does not.

/// `a * b + c` rounded once (a fused multiply-add), as the portable kernels
/// reproduce the SIMD ones' FMAs. Where the build targets FMA hardware (and
/// on every aarch64 CPU, whose base instruction set has it) this is the
/// instruction; otherwise `mul_add` would call the C library's `fmaf`
/// for every element, so it is computed here: the product is exact in f64,
/// the sum is rounded to odd there (its exact error, from TwoSum, moves an
/// even result to the odd neighbour on the error's side), and rounding that
/// to f32 is the correctly rounded result, 29 spare bits being more than the
/// two that rounding to odd needs.
#[inline(always)]
pub(crate) fn fma_f32(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
        return a.mul_add(b, c);
    }
    let (p, c) = (a as f64 * b as f64, c as f64);
    let s = p + c;
    let v = s - p;
    let err = (p - (s - v)) + (c - v);
    let bits = s.to_bits();
    let odd = if err != 0.0 && bits & 1 == 0 {
        // Away from zero when the error has the result's sign, else toward it.
        f64::from_bits(if (err > 0.0) == (s > 0.0) { bits + 1 } else { bits - 1 })
    } else {
        s
    };
    odd as f32
}

/// [`fma_f32`] on eight lanes at once: `acc[j] = fma(a, b[j], acc[j])`,
/// without branches, so that the lanes' f64 arithmetic vectorises. `HW`:
/// the caller is compiled for FMA hardware (`target_feature(enable =
/// "fma")`, see `with_fma`), where `mul_add` is the instruction.
#[inline(always)]
pub(crate) fn fma_f32_lanes<const HW: bool>(a: f32, b: &[f32; 8], acc: &mut [f32; 8]) {
    if HW || cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
        for (c, &b) in acc.iter_mut().zip(b) {
            *c = a.mul_add(b, *c);
        }
        return;
    }
    let a = a as f64;
    for (c, &b) in acc.iter_mut().zip(b) {
        let (p, c64) = (a * b as f64, *c as f64);
        let s = p + c64;
        let v = s - p;
        let err = (p - (s - v)) + (c64 - v);
        let bits = s.to_bits();
        let to_odd = (err != 0.0) & (bits & 1 == 0);
        let step = if (err > 0.0) == (s > 0.0) { 1u64 } else { u64::MAX };
        *c = f64::from_bits(bits.wrapping_add(if to_odd { step } else { 0 })) as f32;
    }
}

/// Defines `$name(args) -> $ret` as `$body::<HW>(args)`, with `HW` true
/// where the CPU has FMA hardware: the portable kernels' fused
/// multiply-adds are then single instructions instead of [`fma_f32`]'s
/// emulation (the same results, several times faster).
macro_rules! with_fma {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident;) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("fma") {
                #[target_feature(enable = "fma")]
                unsafe fn fused($($arg: $ty),*) -> $ret {
                    $body::<true>($($arg),*)
                }
                // SAFETY: the CPU has FMA (checked above), all `fused` needs.
                return unsafe { fused($($arg),*) };
            }
            $body::<false>($($arg),*)
        }
    };
}
pub(crate) use with_fma;

#[cfg(test)]
mod tests {
    #[test]
    fn fma_f32_is_the_fused_multiply_add() {
        // Cases where the product's rounding matters, and near-cancellations.
        let mut x = 0x1234_5678u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f32::from_bits((x & 0x807f_ffff) | ((100 + x % 56) << 23))
        };
        for _ in 0..200_000 {
            let (a, b) = (next(), next());
            for c in [next(), -(a * b), -(a * b) * (1.0 + f32::EPSILON), 0.0] {
                let want = a.mul_add(b, c);
                assert_eq!(super::fma_f32(a, b, c).to_bits(), want.to_bits(), "fma({a:e}, {b:e}, {c:e})");
            }
        }
        let tie = 1.0 + f32::EPSILON / 2.0;
        assert_eq!(super::fma_f32(tie, tie, -1.0), tie.mul_add(tie, -1.0));
        for _ in 0..20_000 {
            let a = next();
            let b: [f32; 8] = std::array::from_fn(|_| next());
            let mut acc: [f32; 8] = std::array::from_fn(|j| if j % 3 == 0 { -(a * b[j]) } else { next() });
            let want: Vec<f32> = acc.iter().zip(&b).map(|(&c, &b)| a.mul_add(b, c)).collect();
            super::fma_f32_lanes::<false>(a, &b, &mut acc);
            assert_eq!(acc.to_vec(), want);
        }
    }
}
