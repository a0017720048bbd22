//! Floor 1 of the controller: the domain. Plain values and pure rules — no
//! I/O, no tokio, no SQL. Every floor above may import this one; this one
//! imports nothing of the controller outside itself.
//!
//! Architecture invariant: nothing in `domain` reads a clock, a socket, a
//! file or the database; a test of it needs no runtime.

pub mod checks;
pub mod cleanup;
pub mod host;
pub mod job;
pub mod policy;
pub mod reconcile;
pub mod view;
pub mod wire;

/// A stored or received name that is not one of the values its type knows.
/// Reading it refuses (never a default that permits): the caller turns this
/// into a `Corrupt` error, an alarm, and a refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownValue {
    /// What was being read ("job kind", "host status", ...).
    pub what: &'static str,
    /// The value as found (cut to 64 characters).
    pub value: String,
}

impl UnknownValue {
    /// An unknown `what` with the value found (cut so a huge value cannot
    /// flood a log line or an alarm).
    pub fn new(what: &'static str, value: &str) -> Self {
        UnknownValue { what, value: value.chars().take(64).collect() }
    }
}

/// Defines a fieldless enum with one exact name per variant: `as_str`,
/// `ALL`, `Display`, and a strict `FromStr` (the exact name only; anything
/// else is [`UnknownValue`]). For stored and wire values, where leniency
/// would turn a corrupt value into a permitted one.
#[macro_export]
macro_rules! named_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident as $what:literal { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            /// The one name of this value (database, API, logs).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }
        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl ::std::str::FromStr for $name {
            type Err = $crate::domain::UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s { $($s => Ok($name::$v),)+ _ => Err($crate::domain::UnknownValue::new($what, s)) }
            }
        }
    };
}

named_enum! {
    /// What a job does.
    pub enum JobKind as "job kind" {
        /// A forced migration: the source is proven off, its guests are
        /// recreated elsewhere.
        Migrate = "migrate",
        /// A planned move of one guest while its source talks.
        Move = "move",
    }
}

named_enum! {
    /// How a job's source was proven off.
    pub enum PowerEvidence as "power evidence" {
        /// None (a plan that refused before its power check had a result).
        None = "",
        /// A planned move: the source is talking and its agent stops the guest itself.
        StoppedByAgent = "stopped-by-agent",
        /// The BMC read Off.
        BmcOff = "bmc-off",
        /// The BMC was told to power off and then read Off.
        BmcFence = "bmc-fence",
        /// An operator attested it, in the audit log.
        Attestation = "attestation",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        for k in JobKind::ALL {
            assert_eq!(k.as_str().parse::<JobKind>(), Ok(*k));
        }
        for p in PowerEvidence::ALL {
            assert_eq!(p.as_str().parse::<PowerEvidence>(), Ok(*p));
        }
        for bad in ["MIGRATE", " migrate", "migrate ", "cleanup", "\u{0}"] {
            let e = bad.parse::<JobKind>().unwrap_err();
            assert_eq!(e.what, "job kind");
        }
        assert!("Attestation".parse::<PowerEvidence>().is_err());
        assert_eq!(UnknownValue::new("x", &"a".repeat(1000)).value.len(), 64);
    }
}
