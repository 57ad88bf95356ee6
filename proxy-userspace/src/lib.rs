//! keyward's user space: the `keyward` daemon and CLI. Library modules so the
//! integration tests in `tests/` can drive the data plane directly.
#![deny(unsafe_code)]

pub mod accept;
pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod journal;
pub mod lists;
pub mod logging;
pub mod metrics;
pub mod paths;
pub mod proxy;
pub mod shared;
pub mod store;
pub mod token;
pub mod units;
