//! Argument checks shared by the CPU oracle and the CUDA launchers: buffer lengths (the
//! shapes check their own element counts against overflow). Every op runs them before
//! it reads or writes anything, so bad input is an [`Error`] naming the argument, never
//! a panic.

use crate::{Error, Result};

/// Checks a buffer's length against what the shape needs.
pub(crate) fn check_len(name: &'static str, actual: usize, expected: usize) -> Result<()> {
    if actual != expected {
        return Err(Error::Length {
            name,
            expected,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_mismatch_names_the_buffer() {
        assert!(check_len("x", 4, 4).is_ok());
        let e = check_len("x", 3, 4).unwrap_err();
        assert!(matches!(
            e,
            Error::Length {
                name: "x",
                expected: 4,
                actual: 3
            }
        ));
    }
}
