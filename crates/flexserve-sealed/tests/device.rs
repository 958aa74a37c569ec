//! Sealing to a device key: the device opens the file with its secret key.

use std::path::{Path, PathBuf};

use flexserve_gguf::{GgmlType, GgufWriter, Value};
use flexserve_sealed::{
    seal_file, unseal_to_gguf_bytes, DevicePublicKey, DeviceSecretKey, ModelKey, SealError, SealOptions, SealedHeader,
    SealedModel, KEY_WRAP_LEN, PREAMBLE_LEN,
};

fn tiny_gguf(dir: &Path) -> PathBuf {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.add_tensor("a", GgmlType::F32, &[3000], (0..12000).map(|i| (i * 7 % 256) as u8).collect()).unwrap();
    w.add_tensor("b", GgmlType::F32, &[5], vec![9; 20]).unwrap();
    let path = dir.join("tiny.gguf");
    w.write_file(&path).unwrap();
    path
}

fn seal_to(dir: &Path, device: &DeviceSecretKey, key: &ModelKey) -> (PathBuf, PathBuf) {
    let gguf = tiny_gguf(dir);
    let sealed = dir.join("tiny.fsm");
    let opts = SealOptions { chunk_size: 4096, to_device: Some(device.public_key()) };
    seal_file(&gguf, &sealed, key, &opts, &mut |_, _| {}).unwrap();
    (gguf, sealed)
}

#[test]
fn device_opens_a_file_sealed_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let (device, vendor_key) = (DeviceSecretKey::generate(), ModelKey::generate());
    let (gguf, sealed) = seal_to(dir.path(), &device, &vendor_key);
    let bytes = std::fs::read(&sealed).unwrap();
    let header = SealedHeader::read(&bytes).unwrap();
    assert_eq!(header.wrapped_to_device(), Some(device.public_key()));
    let key = ModelKey::unwrap_for_device(&header, &device).unwrap();
    SealedModel::open(&bytes, &key).unwrap();
    assert_eq!(unseal_to_gguf_bytes(&sealed, &key).unwrap(), std::fs::read(&gguf).unwrap());
    // The vendor's model key still opens it.
    assert_eq!(unseal_to_gguf_bytes(&sealed, &vendor_key).unwrap(), std::fs::read(&gguf).unwrap());
}

#[test]
fn other_devices_and_unwrapped_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (device, vendor_key) = (DeviceSecretKey::generate(), ModelKey::generate());
    let (gguf, sealed) = seal_to(dir.path(), &device, &vendor_key);
    let header = SealedHeader::read(&std::fs::read(&sealed).unwrap()).unwrap();
    let err = ModelKey::unwrap_for_device(&header, &DeviceSecretKey::generate()).unwrap_err();
    assert!(matches!(err, SealError::WrongDevice { .. }), "{err}");
    assert!(err.to_string().contains(&device.public_key().to_hex()), "{err}");

    let plain_sealed = dir.path().join("plain.fsm");
    seal_file(&gguf, &plain_sealed, &vendor_key, &SealOptions::default(), &mut |_, _| {}).unwrap();
    let header = SealedHeader::read(&std::fs::read(&plain_sealed).unwrap()).unwrap();
    assert_eq!(header.wrapped_to_device(), None);
    assert!(matches!(ModelKey::unwrap_for_device(&header, &device), Err(SealError::NotDeviceWrapped)));
}

/// Every bit of the key-wrap section is protected twice: by the wrap's own
/// GCM tag and by the header tag under the model key.
#[test]
fn modified_key_wrap_sections_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (device, vendor_key) = (DeviceSecretKey::generate(), ModelKey::generate());
    let (_, sealed) = seal_to(dir.path(), &device, &vendor_key);
    let bytes = std::fs::read(&sealed).unwrap();
    for pos in PREAMBLE_LEN..PREAMBLE_LEN + KEY_WRAP_LEN {
        let mut b = bytes.clone();
        b[pos] ^= 0x04;
        let header = SealedHeader::read(&b).unwrap();
        let err = ModelKey::unwrap_for_device(&header, &device).unwrap_err();
        if pos < PREAMBLE_LEN + 32 {
            assert!(matches!(err, SealError::WrongDevice { .. }), "byte {pos}: {err}");
        } else {
            assert!(matches!(err, SealError::KeyUnwrap), "byte {pos}: {err}");
        }
        let err = SealedModel::open(&b, &vendor_key).unwrap_err();
        assert!(matches!(err, SealError::HeaderAuth), "byte {pos}: {err}");
    }
    // Clearing the flag (and with it the section length) breaks the header.
    let mut b = bytes.clone();
    b[12] = 0;
    assert!(SealedModel::open(&b, &vendor_key).is_err());
    b[68..72].copy_from_slice(&0u32.to_le_bytes());
    assert!(SealedModel::open(&b, &vendor_key).is_err());
}

#[test]
fn device_keys_round_trip_through_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let device = DeviceSecretKey::from_bytes([3; 32]);
    let (secret_path, public_path) = (dir.path().join("device.key"), dir.path().join("device.pub"));
    device.save(&secret_path).unwrap();
    device.public_key().save(&public_path).unwrap();
    assert_eq!(std::fs::metadata(&secret_path).unwrap().permissions().mode() & 0o777, 0o600);
    let loaded = DeviceSecretKey::load(&secret_path).unwrap();
    assert_eq!(loaded.public_key(), device.public_key());
    let public = DevicePublicKey::load(&public_path).unwrap();
    assert_eq!(public, device.public_key());
    assert_eq!(DevicePublicKey::from_hex(&public.to_hex()).unwrap(), public);
    assert!(DevicePublicKey::from_hex("12").is_err());
    assert_eq!(format!("{device:?}"), "DeviceSecretKey(<redacted>)");
    // Sealing to a low-order point (all zeros) is refused.
    let dir2 = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir2.path());
    let opts = SealOptions { to_device: Some(DevicePublicKey::from_bytes([0; 32])), ..Default::default() };
    let err = seal_file(&gguf, &dir2.path().join("x.fsm"), &ModelKey::generate(), &opts, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, SealError::InvalidKey(_)), "{err}");
}

#[test]
fn open_with_keys_picks_the_key_that_fits() {
    let dir = tempfile::tempdir().unwrap();
    let (device, vendor_key) = (DeviceSecretKey::generate(), ModelKey::generate());
    let (_, sealed) = seal_to(dir.path(), &device, &vendor_key);
    let bytes = std::fs::read(&sealed).unwrap();
    let others = [ModelKey::generate(), ModelKey::generate()];
    // The device key, the vendor's model key among others, each opens it.
    SealedModel::open_with_keys(&bytes, Some(&device), &[], None).unwrap();
    let with_vendor = [ModelKey::generate(), vendor_key];
    SealedModel::open_with_keys(&bytes, None, &with_vendor, None).unwrap();
    // Keys that do not fit are named as such.
    let e = SealedModel::open_with_keys(&bytes, None, &others, None).err().unwrap();
    assert!(matches!(e, SealError::WrongKey), "{e}");
    let e = SealedModel::open_with_keys(&bytes, Some(&DeviceSecretKey::generate()), &others, None).err().unwrap();
    assert!(matches!(e, SealError::WrongDevice { .. }), "{e}");
    // A tampered header is refused whichever key fits.
    let mut bad = bytes.clone();
    bad[PREAMBLE_LEN + KEY_WRAP_LEN + 40] ^= 1;
    assert!(SealedModel::open_with_keys(&bad, Some(&device), &[], None).is_err());
    assert!(SealedModel::open_with_keys(&bad, None, &with_vendor, None).is_err());
}
