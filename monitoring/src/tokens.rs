//! Token-endpoint label sets: grant types and refresh outcomes, both closed lists so that no
//! request value can become a label.

/// Grant types counted by name in `gateway_tokens_issued_total`; anything else is `other`.
pub const GRANT_TYPES: [&str; 10] = [
    "refresh_token",
    "client_credentials",
    "authorization_code",
    "password",
    "implicit",
    "urn:ietf:params:oauth:grant-type:jwt-bearer",
    "urn:ietf:params:oauth:grant-type:saml2-bearer",
    "urn:ietf:params:oauth:grant-type:device_code",
    "urn:ietf:params:oauth:grant-type:token-exchange",
    "other",
];

/// Index into [`GRANT_TYPES`]; unknown grant types map to `other`.
pub(crate) fn grant_type_index(grant_type: &str) -> usize {
    GRANT_TYPES
        .iter()
        .position(|g| *g == grant_type)
        .unwrap_or(GRANT_TYPES.len() - 1)
}

/// How one refresh request ended, as counted in `gateway_refresh_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefreshOutcome {
    Ok,
    InvalidGrant,
    /// A refresh token that was already rotated was presented again.
    ReuseDetected,
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    UnauthorizedClient,
    UnsupportedGrantType,
    /// The token just rotated was presented again within the reuse grace window (a client
    /// that lost the answer, or lost a race to a concurrent refresh of it): answered with the
    /// same new pair, not counted as reuse. Outside the window that is `ReuseDetected`.
    Replayed,
    /// The filter itself failed (store down, ...).
    Error,
}

impl RefreshOutcome {
    pub const ALL: [RefreshOutcome; 10] = [
        RefreshOutcome::Ok,
        RefreshOutcome::InvalidGrant,
        RefreshOutcome::ReuseDetected,
        RefreshOutcome::InvalidClient,
        RefreshOutcome::InvalidRequest,
        RefreshOutcome::InvalidScope,
        RefreshOutcome::UnauthorizedClient,
        RefreshOutcome::UnsupportedGrantType,
        RefreshOutcome::Replayed,
        RefreshOutcome::Error,
    ];

    /// The label of each outcome, in the order of [`RefreshOutcome::ALL`].
    pub(crate) const LABELS: [&'static str; 10] = {
        let mut labels = [""; 10];
        let mut i = 0;
        while i < labels.len() {
            labels[i] = Self::ALL[i].as_str();
            i += 1;
        }
        labels
    };

    pub const fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Ok => "ok",
            RefreshOutcome::InvalidGrant => "invalid_grant",
            RefreshOutcome::ReuseDetected => "reuse_detected",
            RefreshOutcome::InvalidClient => "invalid_client",
            RefreshOutcome::InvalidRequest => "invalid_request",
            RefreshOutcome::InvalidScope => "invalid_scope",
            RefreshOutcome::UnauthorizedClient => "unauthorized_client",
            RefreshOutcome::UnsupportedGrantType => "unsupported_grant_type",
            RefreshOutcome::Replayed => "replayed",
            RefreshOutcome::Error => "error",
        }
    }

    /// The outcome named `label` (an RFC 6749 error code or one of ours); anything unknown is
    /// [`RefreshOutcome::Error`].
    pub fn from_label(label: &str) -> RefreshOutcome {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == label)
            .unwrap_or(RefreshOutcome::Error)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_unknown_is_error() {
        for (i, o) in RefreshOutcome::ALL.into_iter().enumerate() {
            assert_eq!(RefreshOutcome::from_label(o.as_str()), o);
            assert_eq!(o.index(), i);
            assert_eq!(RefreshOutcome::LABELS[i], o.as_str());
        }
        assert_eq!(RefreshOutcome::from_label("s3cr3t"), RefreshOutcome::Error);
    }

    #[test]
    fn unknown_grant_type_is_other() {
        assert_eq!(
            GRANT_TYPES[grant_type_index("refresh_token")],
            "refresh_token"
        );
        assert_eq!(GRANT_TYPES[grant_type_index("abcdef123")], "other");
    }
}
