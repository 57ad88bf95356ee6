//! Budget alerts: a warning line, and a JSON POST to the configured webhook,
//! retried in the background so that no request ever waits on it.

use std::time::Duration;

use tracing::warn;

use super::{
    limit::{self, Alert},
    policy::Policy,
};

/// Log `a` and POST it to the webhook, if any.
pub fn raise(p: &Policy, a: &Alert) {
    let fraction = a.fraction as f64 / limit::MICROS as f64;
    let doc = serde_json::json!({
        "alert": "budget",
        "fraction": fraction,
        "spent": limit::format_amount(a.spent),
        "budget": limit::format_amount(a.budget),
        "currency": p.currency,
        "day": a.day,
    });
    warn!(
        fraction,
        spent = %limit::format_amount(a.spent),
        budget = %limit::format_amount(a.budget),
        currency = %p.currency,
        "daily budget alert"
    );
    let Some(url) = p.webhook.clone() else { return };
    let up = p.upstream.clone();
    tokio::spawn(async move {
        for attempt in 0..4u32 {
            match up.post_json(&url, &doc).await {
                Ok(s) if s.is_success() => return,
                Ok(s) => warn!(status = s.as_u16(), attempt, "alert webhook refused"),
                Err(e) => warn!(error = ?e, attempt, "alert webhook failed"),
            }
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
    });
}
