//! What leaves the daemon: the Prometheus exposition (`exposition`, with the helpers every
//! family writer uses in `family`) and its second encoding pushed over OTLP (`otlp`).

pub(crate) mod exposition;
pub(crate) mod family;
pub(crate) mod otlp;
