//! Short texts put together in pieces on the stack (the primary key the fast hit hashes, its
//! `Cache-Status` value): no allocation when they fit, and the caller's own heap path when
//! they do not.

/// Up to `N` bytes written in pieces. Once a piece does not fit, nothing more is kept and
/// [`Self::bytes`] is `None`: never a text cut short.
pub struct OnStack<const N: usize> {
    buf: [u8; N],
    len: usize,
    fits: bool,
}

impl<const N: usize> Default for OnStack<N> {
    fn default() -> Self {
        OnStack {
            buf: [0; N],
            len: 0,
            fits: true,
        }
    }
}

impl<const N: usize> OnStack<N> {
    /// Append `piece`, if it fits after what is there.
    pub fn push(&mut self, piece: &[u8]) {
        match self.buf.get_mut(self.len..self.len + piece.len()) {
            Some(to) if self.fits => {
                to.copy_from_slice(piece);
                self.len += piece.len();
            }
            _ => self.fits = false,
        }
    }

    /// Everything written, or `None` if it did not all fit.
    pub fn bytes(&self) -> Option<&[u8]> {
        self.fits.then(|| &self.buf[..self.len])
    }
}

#[cfg(test)]
mod tests {
    use super::OnStack;

    #[test]
    fn pieces_that_fit_are_kept_and_one_too_many_loses_the_whole() {
        let mut text = OnStack::<4>::default();
        text.push(b"ab");
        text.push(b"");
        text.push(b"cd");
        assert_eq!(text.bytes(), Some(&b"abcd"[..]));
        text.push(b"e");
        assert_eq!(text.bytes(), None);
        // nothing after an overflow is kept either, even what would fit alone
        let mut text = OnStack::<4>::default();
        text.push(b"abcde");
        text.push(b"x");
        assert_eq!(text.bytes(), None);
    }
}
