//! The pipeline's side of the reservation journal ([`crate::journal`]): a
//! reservation is on disk before its call leaves, and a settlement is
//! recorded after it (lazily: a lost one counts the call as spent). A
//! reservation that cannot be written, or whose request goes away while it
//! is being written, is given back: that call never left.

use tracing::warn;

use super::{Forwarder, limit::Reservation, pipeline::Refused, respond::Outcome};
use crate::{
    journal::{Record, Refund, Reserved, TokenCall},
    token::codec::Claims,
};

/// A reservation being written, given back if dropped before [`Held::keep`]
/// (the request went away while it waited).
struct Held<'f> {
    f: &'f Forwarder,
    token: Option<&'f Claims>,
    r: Option<Reservation>,
}

impl Held<'_> {
    fn keep(mut self) -> Option<Reservation> {
        self.r.take()
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.r.take() {
            self.f.give_back(self.token, r);
        }
    }
}

impl Forwarder {
    /// `r` (and the token call it took) on disk, or given back and refused.
    /// Without a journal (`durability = "lose-up-to-1s"`) it is kept as is.
    pub(super) async fn durable<'f>(
        &'f self,
        token: Option<&'f Claims>,
        r: Reservation,
    ) -> Result<Reservation, Refused> {
        let Some(journal) = &self.journal else { return Ok(r) };
        let call = token.map(|c| TokenCall { nonce: c.nonce, expires_unix: c.expires_at });
        let record = Record::Reserved(r.seq(), Reserved::of(&r, call));
        let held = Held { f: self, token, r: Some(r) };
        let unsaved = || Refused::new(Outcome::StoreUnavailable, "the service is unavailable for now");
        match journal.append(record).await {
            Ok(()) => held.keep().ok_or_else(unsaved),
            Err(e) => {
                warn!(error = %e, "a reservation could not be saved: the call is refused");
                Err(unsaved())
            }
        }
    }

    /// A billed call keeps its reservation: recorded with the next commit.
    pub(super) fn journal_billed(&self, r: &Reservation) {
        if let Some(j) = &self.journal {
            j.append_lazy(Record::Billed(r.seq()));
        }
    }

    /// Give back `r` and its token call, and record that with the next commit.
    pub(super) fn give_back(&self, token: Option<&Claims>, r: Reservation) {
        let refund = Refund { of: r.seq(), what: Reserved::of(&r, None) };
        let seq = self.limiter.refund(r);
        if let Some(j) = &self.journal {
            j.append_lazy(Record::Refunded(seq, refund));
        }
        if let Some(c) = token {
            self.token_state.allowance.refund(c.nonce);
        }
    }
}
