//! The architectures tcpstate ships for, and their names in each toolchain's words.

/// An architecture tcpstate ships for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// As `uname -m` and the docs write it (clap would say `x86-64`).
    #[value(name = "x86_64")]
    X86_64,
    Aarch64,
}

impl Arch {
    pub const ALL: [Self; 2] = [Self::X86_64, Self::Aarch64];

    /// Rust's target triple.
    pub const fn triple(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-unknown-linux-gnu",
            Self::Aarch64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// Debian's name of the architecture (packages, images).
    pub const fn debian(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    /// The name in file names and `uname -m`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// The GNU toolchain prefix for C a dependency compiles and for linking; `None` on the
    /// machine's own architecture.
    pub fn cross_prefix(self) -> Option<&'static str> {
        (self != Self::host()).then_some(match self {
            Self::X86_64 => "x86_64-linux-gnu",
            Self::Aarch64 => "aarch64-linux-gnu",
        })
    }

    /// A binutils tool for this architecture: the host's, or the cross one.
    pub fn tool(self, name: &str) -> String {
        self.cross_prefix().map_or_else(|| name.to_owned(), |prefix| format!("{prefix}-{name}"))
    }

    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") { Self::Aarch64 } else { Self::X86_64 }
    }
}
