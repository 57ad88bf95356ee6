//! Exists so the package has a library target: `proxy-userspace` takes it as a
//! build-dependency and cargo rebuilds the embedded object when it changes.
#![no_std]
