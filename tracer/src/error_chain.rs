//! An error with its causes, as one line: what the user reads when something deep in aya or
//! the kernel failed.

use std::error::Error;

/// `error` and each of its sources, outermost first.
pub(crate) fn causes<'a>(
    error: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(error), |current| (*current).source())
}

/// `error: cause: cause`, as anyhow's `{:#}` writes a chain.
pub(crate) fn one_line(error: &(dyn Error + 'static)) -> String {
    causes(error).map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_follows_its_error() {
        let inner = std::io::Error::other("inner");
        let outer = anyhow::Error::new(inner).context("outer");
        let error: &(dyn Error + 'static) = outer.as_ref();
        assert_eq!(one_line(error), "outer: inner");
        assert_eq!(causes(error).count(), 2);
    }
}
