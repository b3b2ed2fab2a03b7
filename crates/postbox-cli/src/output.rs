//! The commands' results on standard output. `println!` panics when the
//! reader has gone (`postbox dead list | head -1`: exit 101 and a panic
//! message); [`outln!`] ends the command instead, and `main` exits 0
//! without a word, as `head`'s caller expects.

use std::io::Write as _;

/// Standard output was closed by its reader.
#[derive(Debug)]
pub(crate) struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for Closed {}

/// Writes one line; [`Closed`] once the reader has gone.
pub(crate) fn line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    match writeln!(std::io::stdout().lock(), "{args}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(anyhow::Error::new(Closed)),
        other => Ok(other?),
    }
}

/// `println!` for results: returns early (`?`) once standard output is
/// closed, so the enclosing function must return `anyhow::Result`.
macro_rules! outln {
    () => {
        $crate::output::line(format_args!(""))?
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))?
    };
}

pub(crate) use outln;
