//! Exists so the package has a library target: `keyward-tests` takes it as a
//! build-dependency and cargo rebuilds the bench object when it changes.
#![no_std]
