//! Vendor signatures: signed round trips, and every way of removing, moving,
//! replacing or damaging a signature is refused when a vendor is required.

use std::path::{Path, PathBuf};

use flexserve_gguf::{GgmlType, GgufWriter, Value};
use flexserve_sealed::{
    seal_file, seal_file_signed, unseal_to_gguf_bytes, DeviceSecretKey, ModelKey, SealError, SealOptions, SealedHeader,
    SealedModel, SignatureFailure, VendorPublicKey, VendorSigningKey, CHUNK_ENTRY_LEN, FLAG_VENDOR_SIGNED,
    HEADER_TAG_LEN, SIGNATURE_SECTION_LEN,
};
use ring::{hkdf, hmac};

const MODEL_KEY: [u8; 32] = [0x42; 32];

fn tiny_gguf(dir: &Path) -> PathBuf {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.name", Value::String("signed test model".into()));
    w.add_tensor("a", GgmlType::F32, &[3000], (0..12000).map(|i| (i * 7 % 256) as u8).collect()).unwrap();
    w.add_tensor("b", GgmlType::F32, &[5], vec![9; 20]).unwrap();
    let path = dir.join("tiny.gguf");
    w.write_file(&path).unwrap();
    path
}

struct Fixture {
    _dir: tempfile::TempDir,
    gguf: PathBuf,
    signed: Vec<u8>,
    unsigned: Vec<u8>,
    key: ModelKey,
    vendor: VendorSigningKey,
}

fn opts() -> SealOptions {
    SealOptions { chunk_size: 4096, ..Default::default() }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let key = ModelKey::from_bytes(&MODEL_KEY).unwrap();
    let vendor = VendorSigningKey::generate();
    let (signed, unsigned) = (dir.path().join("signed.fsm"), dir.path().join("unsigned.fsm"));
    seal_file_signed(&gguf, &signed, &key, &opts(), Some(&vendor), &mut |_, _| {}).unwrap();
    seal_file(&gguf, &unsigned, &key, &opts(), &mut |_, _| {}).unwrap();
    Fixture {
        signed: std::fs::read(signed).unwrap(),
        unsigned: std::fs::read(unsigned).unwrap(),
        _dir: dir,
        gguf,
        key,
        vendor,
    }
}

/// Opens the header with a required vendor key, then every chunk.
fn open_all(bytes: &[u8], key: &ModelKey, vendor: Option<&VendorPublicKey>) -> Result<Vec<u8>, SealError> {
    let model = SealedModel::open_verified(bytes, key, vendor)?;
    let mut out = Vec::new();
    for (index, c) in model.header().chunks.iter().enumerate() {
        let range = c.file_offset as usize..(c.file_offset as usize + c.sealed_len()).min(bytes.len());
        let mut plain = vec![0; c.len as usize];
        model.open_chunk(index, bytes.get(range).unwrap_or(&[]), &mut plain)?;
        out.extend_from_slice(&plain);
    }
    Ok(out)
}

fn failure(err: SealError) -> SignatureFailure {
    match err {
        SealError::Signature { failure } => failure,
        other => panic!("expected a signature error, got {other}"),
    }
}

/// What a holder of the model key (but not of the vendor's signing key) can
/// do: recompute the header tag over a modified header region.
fn retag(bytes: &mut [u8], tag_offset: usize) {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let file_id: [u8; 32] = bytes[16..48].try_into().unwrap();
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &file_id).extract(&MODEL_KEY);
    let mut header_key = [0u8; 32];
    prk.expand(&[b"flexserve sealed model v1", &file_id, b"header authentication"], Len(32))
        .unwrap()
        .fill(&mut header_key)
        .unwrap();
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &header_key), &bytes[..tag_offset]);
    bytes[tag_offset..tag_offset + HEADER_TAG_LEN].copy_from_slice(tag.as_ref());
}

#[test]
fn signed_round_trip() {
    let f = fixture();
    let vendor = f.vendor.public_key();
    let h = SealedHeader::read(&f.signed).unwrap();
    assert!(h.is_signed());
    assert_eq!(h.signed_by(), Some(vendor));
    assert_eq!(h.chunks_offset, h.tag_offset + (HEADER_TAG_LEN + SIGNATURE_SECTION_LEN) as u64);
    assert_eq!(u32::from_le_bytes(f.signed[12..16].try_into().unwrap()), FLAG_VENDOR_SIGNED);
    let expected_data = std::fs::read(&f.gguf).unwrap()[h.gguf_header_len as usize..].to_vec();
    let expected_data = &expected_data[..h.chunks.iter().map(|c| c.len as usize).sum::<usize>()];
    assert_eq!(open_all(&f.signed, &f.key, Some(&vendor)).unwrap(), expected_data);
    assert_eq!(open_all(&f.signed, &f.key, None).unwrap(), expected_data);
    h.verify_signature(&f.signed, Some(&vendor)).unwrap();

    // Unsealing a signed file gives back the original GGUF.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signed.fsm");
    std::fs::write(&path, &f.signed).unwrap();
    assert_eq!(unseal_to_gguf_bytes(&path, &f.key).unwrap(), std::fs::read(&f.gguf).unwrap());

    // The unsigned file says so.
    let h = SealedHeader::read(&f.unsigned).unwrap();
    assert!(!h.is_signed());
    assert_eq!(h.signed_by(), None);
    assert_eq!(open_all(&f.unsigned, &f.key, None).unwrap(), expected_data);
}

#[test]
fn signed_and_device_wrapped_file_opens_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let device = DeviceSecretKey::generate();
    let vendor = VendorSigningKey::generate();
    let key = ModelKey::generate();
    let out = dir.path().join("both.fsm");
    let opts = SealOptions { chunk_size: 4096, to_device: Some(device.public_key()) };
    seal_file_signed(&gguf, &out, &key, &opts, Some(&vendor), &mut |_, _| {}).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let h = SealedHeader::read(&bytes).unwrap();
    assert!(h.is_signed() && h.wrapped_to_device().is_some());
    let unwrapped = ModelKey::unwrap_for_device(&h, &device).unwrap();
    open_all(&bytes, &unwrapped, Some(&vendor.public_key())).unwrap();
}

#[test]
fn unsigned_file_is_refused_when_a_vendor_is_required() {
    let f = fixture();
    let vendor = f.vendor.public_key();
    let err = failure(SealedModel::open_verified(&f.unsigned, &f.key, Some(&vendor)).unwrap_err());
    assert_eq!(err, SignatureFailure::Missing { required: vendor.to_hex() });
    assert!(err.to_string().contains("not signed"), "{err}");
}

#[test]
fn other_vendors_key_is_refused() {
    let f = fixture();
    let other = VendorSigningKey::generate().public_key();
    let err = failure(SealedModel::open_verified(&f.signed, &f.key, Some(&other)).unwrap_err());
    assert_eq!(err, SignatureFailure::OtherVendor { required: other.to_hex(), found: f.vendor.public_key().to_hex() });

    // A file signed by another vendor, with the same model key and model.
    let dir = tempfile::tempdir().unwrap();
    let impostor = VendorSigningKey::generate();
    let path = dir.path().join("impostor.fsm");
    seal_file_signed(&f.gguf, &path, &f.key, &opts(), Some(&impostor), &mut |_, _| {}).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let err = failure(SealedModel::open_verified(&bytes, &f.key, Some(&f.vendor.public_key())).unwrap_err());
    assert!(matches!(err, SignatureFailure::OtherVendor { .. }), "{err}");
    // ... and with the impostor's key swapped for the real vendor's public key in the section.
    let mut swapped = bytes.clone();
    let at = SealedHeader::read(&bytes).unwrap().tag_offset as usize + HEADER_TAG_LEN;
    swapped[at..at + 32].copy_from_slice(f.vendor.public_key().as_bytes());
    let err = failure(SealedModel::open_verified(&swapped, &f.key, Some(&f.vendor.public_key())).unwrap_err());
    assert!(matches!(err, SignatureFailure::Invalid { .. }), "{err}");
}

#[test]
fn every_bit_flip_of_the_signature_section_is_refused() {
    let f = fixture();
    let vendor = f.vendor.public_key();
    let h = SealedHeader::read(&f.signed).unwrap();
    let start = h.tag_offset as usize + HEADER_TAG_LEN;
    assert_eq!(start + SIGNATURE_SECTION_LEN, h.chunks_offset as usize);
    for pos in start..start + SIGNATURE_SECTION_LEN {
        for bit in 0..8 {
            let mut bytes = f.signed.clone();
            bytes[pos] ^= 1 << bit;
            let err = failure(open_all(&bytes, &f.key, Some(&vendor)).unwrap_err());
            if pos < start + 32 {
                assert!(matches!(err, SignatureFailure::OtherVendor { .. }), "byte {pos} bit {bit}: {err}");
            } else {
                assert!(matches!(err, SignatureFailure::Invalid { .. }), "byte {pos} bit {bit}: {err}");
            }
            // Opening without a required vendor still checks the signature
            // under the key the file names.
            let err = failure(open_all(&bytes, &f.key, None).unwrap_err());
            assert!(matches!(err, SignatureFailure::Invalid { .. }), "byte {pos} bit {bit}: {err}");
        }
    }
}

#[test]
fn every_bit_flip_of_the_signed_region_is_refused() {
    let f = fixture();
    let vendor = f.vendor.public_key();
    let h = SealedHeader::read(&f.signed).unwrap();
    let tag_offset = h.tag_offset as usize;
    for pos in 0..tag_offset {
        for bit in 0..8 {
            let mut bytes = f.signed.clone();
            bytes[pos] ^= 1 << bit;
            assert!(open_all(&bytes, &f.key, Some(&vendor)).is_err(), "flip of bit {bit} at byte {pos} accepted");
            // A model key holder re-tags the modified header: the header tag
            // passes, the vendor signature does not.
            retag(&mut bytes, tag_offset);
            let err = open_all(&bytes, &f.key, Some(&vendor)).expect_err("re-tagged flip accepted");
            assert!(
                !matches!(err, SealError::HeaderAuth | SealError::ChunkAuth { .. }),
                "re-tagged flip of bit {bit} at byte {pos} was not caught by the header checks: {err}"
            );
        }
    }
    // The re-tagging itself is right: the unmodified file re-tags to itself.
    let mut same = f.signed.clone();
    retag(&mut same, tag_offset);
    assert_eq!(same, f.signed);
}

#[test]
fn modified_metadata_with_a_fresh_tag_fails_the_signature() {
    let f = fixture();
    let vendor = f.vendor.public_key();
    let h = SealedHeader::read(&f.signed).unwrap();
    let at = f.signed.windows(6).position(|w| w == b"signed").unwrap();
    let mut bytes = f.signed.clone();
    bytes[at] = b'S';
    retag(&mut bytes, h.tag_offset as usize);
    for required in [Some(&vendor), None] {
        let err = failure(SealedModel::open_verified(&bytes, &f.key, required).unwrap_err());
        assert_eq!(err, SignatureFailure::Invalid { signer: vendor.to_hex() });
    }
}

#[test]
fn stripped_moved_or_transplanted_signatures_are_refused() {
    let f = fixture();
    let vendor = f.vendor.public_key();
    let h = SealedHeader::read(&f.signed).unwrap();
    let (tag, sig, chunks) = (h.tag_offset as usize, h.tag_offset as usize + HEADER_TAG_LEN, h.chunks_offset as usize);
    let section = f.signed[sig..chunks].to_vec();

    // Section cut out, flag left set.
    let cut = [&f.signed[..sig], &f.signed[chunks..]].concat();
    assert!(open_all(&cut, &f.key, Some(&vendor)).is_err());
    assert!(open_all(&cut, &f.key, None).is_err());

    // Section cut out and the flag cleared, without the model key.
    let mut cleared = cut.clone();
    cleared[12] &= !(FLAG_VENDOR_SIGNED as u8);
    assert!(open_all(&cleared, &f.key, Some(&vendor)).is_err());
    assert!(open_all(&cleared, &f.key, None).is_err());

    // A model key holder strips it properly: flag cleared, chunk offsets
    // moved up, header re-tagged. A valid unsigned file, refused when the
    // vendor is required.
    let table = tag - h.chunks.len() * CHUNK_ENTRY_LEN;
    for entry in cleared[table..tag].chunks_exact_mut(CHUNK_ENTRY_LEN) {
        let offset = u64::from_le_bytes(entry[16..24].try_into().unwrap());
        entry[16..24].copy_from_slice(&(offset - SIGNATURE_SECTION_LEN as u64).to_le_bytes());
    }
    retag(&mut cleared, tag);
    open_all(&cleared, &f.key, None).expect("a re-tagged unsigned file is a valid unsigned file");
    let err = failure(open_all(&cleared, &f.key, Some(&vendor)).unwrap_err());
    assert!(matches!(err, SignatureFailure::Missing { .. }), "{err}");

    // Section moved to the end of the file, before the tag, or into the
    // first chunk's place.
    let at_end = [&f.signed[..sig], &f.signed[chunks..], &section].concat();
    let before_tag = [&f.signed[..tag], &section, &f.signed[tag..sig], &f.signed[chunks..]].concat();
    let after_chunk = {
        let first = h.chunks[0].sealed_len();
        [&f.signed[..sig], &f.signed[chunks..chunks + first], &section, &f.signed[chunks + first..]].concat()
    };
    for (what, bytes) in [("at end", at_end), ("before tag", before_tag), ("after first chunk", after_chunk)] {
        assert!(open_all(&bytes, &f.key, Some(&vendor)).is_err(), "section moved {what} accepted");
        assert!(open_all(&bytes, &f.key, None).is_err(), "section moved {what} accepted");
    }

    // The signature section of another sealing of the same model, by the
    // same vendor: it signs another file id.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("again.fsm");
    seal_file_signed(&f.gguf, &path, &f.key, &opts(), Some(&f.vendor), &mut |_, _| {}).unwrap();
    let again = std::fs::read(&path).unwrap();
    let mut transplanted = f.signed.clone();
    transplanted[sig..chunks].copy_from_slice(&again[sig..chunks]);
    assert_ne!(transplanted, f.signed);
    let err = failure(open_all(&transplanted, &f.key, Some(&vendor)).unwrap_err());
    assert!(matches!(err, SignatureFailure::Invalid { .. }), "{err}");

    // A signature section grafted onto the unsigned file, flag set.
    let mut grafted = [&f.unsigned[..tag + HEADER_TAG_LEN], &section, &f.unsigned[tag + HEADER_TAG_LEN..]].concat();
    grafted[12] |= FLAG_VENDOR_SIGNED as u8;
    assert!(open_all(&grafted, &f.key, Some(&vendor)).is_err());
}

#[test]
fn vendor_keys_round_trip_through_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (secret_path, public_path) = (dir.path().join("vendor.key"), dir.path().join("vendor.pub"));
    let vendor = VendorSigningKey::from_seed(&[7; 32]).unwrap();
    vendor.save(&secret_path).unwrap();
    vendor.public_key().save(&public_path).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&secret_path), 0o600);
    assert_eq!(mode(&public_path), 0o644);
    assert_eq!(std::fs::read_to_string(&secret_path).unwrap(), format!("{}\n", "07".repeat(32)));

    let loaded = VendorSigningKey::load(&secret_path).unwrap();
    assert_eq!(loaded.public_key(), vendor.public_key());
    assert_eq!(loaded.clone().public_key(), vendor.public_key());
    assert_eq!(VendorPublicKey::load(&public_path).unwrap(), vendor.public_key());
    let hex = vendor.public_key().to_hex();
    assert_eq!(VendorPublicKey::from_hex(&format!(" {hex}\n")).unwrap(), vendor.public_key());
    assert_ne!(VendorSigningKey::generate().public_key(), vendor.public_key());
    assert!(!format!("{vendor:?}").contains(&"07".repeat(32)));
    assert!(format!("{vendor:?}").contains("redacted"));

    // Files sealed with the loaded key verify under the saved public key.
    let gguf = tiny_gguf(dir.path());
    let out = dir.path().join("m.fsm");
    let key = ModelKey::generate();
    seal_file_signed(&gguf, &out, &key, &opts(), Some(&loaded), &mut |_, _| {}).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    SealedModel::open_verified(&bytes, &key, Some(&VendorPublicKey::load(&public_path).unwrap())).unwrap();

    // Bad key files and strings are refused with the reason.
    std::fs::write(&secret_path, "abc\n").unwrap();
    assert!(matches!(VendorSigningKey::load(&secret_path), Err(SealError::KeyFile { .. })));
    assert!(matches!(VendorPublicKey::from_hex("zz"), Err(SealError::InvalidKey(_))));
    assert!(matches!(VendorSigningKey::from_seed(&[1; 31]), Err(SealError::InvalidKey(_))));
    // A public key that is not a curve point verifies nothing.
    let bogus = VendorPublicKey::from_bytes([0xff; 32]);
    let mut forged = bytes.clone();
    let at = SealedHeader::read(&bytes).unwrap().tag_offset as usize + HEADER_TAG_LEN;
    forged[at..at + 32].copy_from_slice(bogus.as_bytes());
    let err = failure(SealedModel::open_verified(&forged, &key, Some(&bogus)).unwrap_err());
    assert!(matches!(err, SignatureFailure::Invalid { .. }), "{err}");
}
