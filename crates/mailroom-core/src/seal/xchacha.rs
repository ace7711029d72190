//! XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03): HChaCha20 turns the key
//! and the nonce's first 16 bytes into a subkey, and ChaCha20-Poly1305 of
//! RFC 8439 seals under it with the nonce's last 8 bytes. The second step
//! is ring's, in assembly chosen at run time for the CPU: the same bytes as
//! RustCrypto's `XChaCha20Poly1305` (a test holds them to it), at about
//! twice its speed in a portable build, where its AVX2 code cannot inline
//! its intrinsics.

use chacha20::{R20, hchacha};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroizing;

use super::keyring::KEY_LEN;

/// Length of the extended nonce.
pub const NONCE_LEN: usize = 24;

/// Length of the tag.
pub const TAG_LEN: usize = 16;

/// Encrypts `data` in place; returns the tag.
pub fn seal(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    data: &mut [u8],
) -> Option<[u8; TAG_LEN]> {
    let (key, nonce) = derive(key, nonce)?;
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(ad), data)
        .ok()?;
    tag.as_ref().try_into().ok()
}

/// Decrypts `data` (ciphertext, then tag) in place; returns the plaintext,
/// or `None` if it does not authenticate.
pub fn open<'a>(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    data: &'a mut [u8],
) -> Option<&'a mut [u8]> {
    let (key, nonce) = derive(key, nonce)?;
    key.open_in_place(nonce, Aad::from(ad), data).ok()
}

/// The subkey and the 12-byte nonce of the inner ChaCha20-Poly1305.
fn derive(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN]) -> Option<(LessSafeKey, Nonce)> {
    let (head, tail) = nonce.split_at(16);
    let subkey: Zeroizing<[u8; KEY_LEN]> =
        Zeroizing::new(hchacha::<R20>(key.into(), &head.try_into().ok()?).into());
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &subkey[..]).ok()?);
    let mut inner = [0u8; 12];
    inner[4..].copy_from_slice(tail);
    Some((key, Nonce::assume_unique_for_key(inner)))
}

#[cfg(test)]
mod tests {
    use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
    use chacha20poly1305::{XChaCha20Poly1305, XNonce};

    use super::*;

    #[test]
    fn the_same_bytes_as_rustcrypto_both_ways() {
        let key = [7u8; KEY_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        for (byte, value) in nonce.iter_mut().zip(1u8..) {
            *byte = value;
        }
        let ad = b"mailroom-seal\0context";
        let reference = XChaCha20Poly1305::new_from_slice(&key).expect("key");
        for len in [0, 1, 63, 64, 65, 2048, 2357] {
            let plaintext: Vec<u8> = (0..=u8::MAX).cycle().take(len).collect();
            let expected = reference
                .encrypt(
                    &XNonce::from(nonce),
                    Payload {
                        msg: &plaintext,
                        aad: ad,
                    },
                )
                .expect("reference seals");
            let mut ours = plaintext.clone();
            let tag = seal(&key, &nonce, ad, &mut ours).expect("seals");
            ours.extend_from_slice(&tag);
            assert_eq!(ours, expected, "{len} bytes");
            assert_eq!(
                open(&key, &nonce, ad, &mut ours).as_deref(),
                Some(&plaintext[..])
            );
        }
    }

    #[test]
    fn a_changed_byte_anywhere_does_not_open() {
        let key = [9u8; KEY_LEN];
        let nonce = [3u8; NONCE_LEN];
        let mut sealed = b"the job".to_vec();
        let tag = seal(&key, &nonce, b"ad", &mut sealed).expect("seals");
        sealed.extend_from_slice(&tag);
        for i in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 1;
            assert!(
                open(&key, &nonce, b"ad", &mut tampered).is_none(),
                "byte {i}"
            );
        }
        let mut other_nonce = nonce;
        other_nonce[20] ^= 1;
        assert!(open(&key, &other_nonce, b"ad", &mut sealed.clone()).is_none());
        assert!(open(&key, &nonce, b"AD", &mut sealed.clone()).is_none());
    }
}
