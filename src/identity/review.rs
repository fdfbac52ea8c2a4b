//! Who presents a token: the Kubernetes TokenReview API decides, never our own parsing of the
//! JWT. The review must say authenticated, for our audience, for a ServiceAccount, and bound to a
//! pod (the API server then also checks that the pod exists, with the uid in the token).

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

use super::ca::SpiffeId;

/// The `extra` key the API server sets on a review of a token bound to a pod.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";

/// A token longer than this is not a ServiceAccount token (they are around 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The token does not prove an identity (gRPC UNAUTHENTICATED).
    #[error("{0}")]
    Refused(String),
    /// The review could not be made (gRPC UNAVAILABLE: try again).
    #[error("cannot review the token: {0}")]
    Unavailable(String),
}

/// Asks the API server about tokens.
#[derive(Clone)]
pub struct Reviewer {
    client: kube::Client,
    audience: String,
    trust_domain: String,
}

impl Reviewer {
    pub fn new(client: kube::Client, audience: &str, trust_domain: &str) -> Self {
        Reviewer {
            client,
            audience: audience.into(),
            trust_domain: trust_domain.into(),
        }
    }

    /// The identity `token` proves.
    pub async fn review(&self, token: &str) -> Result<SpiffeId, ReviewError> {
        if token.is_empty() {
            return Err(ReviewError::Refused("no token".into()));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(ReviewError::Refused(format!(
                "the token is {} bytes, more than {MAX_TOKEN_BYTES}",
                token.len()
            )));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        judge(&status, &self.audience, &self.trust_domain)
    }
}

/// The decision on a review's status (pure, so that each refusal is tested).
pub fn judge(
    status: &TokenReviewStatus,
    audience: &str,
    trust_domain: &str,
) -> Result<SpiffeId, ReviewError> {
    let refused = |why: String| Err(ReviewError::Refused(why));
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().filter(|e| !e.is_empty());
        return refused(format!(
            "the API server does not accept the token{}",
            why.map(|e| format!(": {e}")).unwrap_or_default()
        ));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == audience))
    {
        return refused(format!(
            "the token is not for audience {audience:?} (project a ServiceAccount token with that audience)"
        ));
    }
    let user = status.user.clone().unwrap_or_default();
    let name = user.username.unwrap_or_default();
    let Some((namespace, service_account)) = name
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
    else {
        return refused(format!(
            "the token is not a ServiceAccount's (user {name:?})"
        ));
    };
    let bound = user
        .extra
        .as_ref()
        .and_then(|e| e.get(POD_NAME))
        .is_some_and(|v| v.iter().any(|p| !p.is_empty()));
    if !bound {
        return refused(format!(
            "the token of {name} is not bound to a pod (use a projected ServiceAccount token)"
        ));
    }
    // The API server enforces these names; a review that breaks them is not one we sign.
    match SpiffeId::new(trust_domain, namespace, service_account) {
        Some(id) => Ok(id),
        None => refused(format!(
            "not a valid identity: spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn status(auth: bool, aud: &[&str], user: &str, pod: Option<&str>) -> TokenReviewStatus {
        let extra = pod.map(|p| BTreeMap::from([(POD_NAME.to_string(), vec![p.to_string()])]));
        TokenReviewStatus {
            authenticated: Some(auth),
            audiences: Some(aud.iter().map(|s| s.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra,
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    const AUD: &str = "meshlet.dev/identity";

    #[test]
    fn a_bound_service_account_token_for_our_audience_is_an_identity() {
        let s = status(
            true,
            &[AUD],
            "system:serviceaccount:shop:cart",
            Some("cart-1"),
        );
        let id = judge(&s, AUD, "cluster.local").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
    }

    #[test]
    fn every_other_review_is_refused_with_its_reason() {
        let cases = [
            (
                TokenReviewStatus {
                    authenticated: Some(false),
                    error: Some("token has expired".into()),
                    ..TokenReviewStatus::default()
                },
                "does not accept the token: token has expired",
            ),
            (
                status(
                    true,
                    &["other"],
                    "system:serviceaccount:shop:cart",
                    Some("p"),
                ),
                "not for audience \"meshlet.dev/identity\"",
            ),
            (
                status(true, &[AUD], "alice", Some("p")),
                "not a ServiceAccount's (user \"alice\")",
            ),
            (
                status(true, &[AUD], "system:serviceaccount:shop:cart", None),
                "not bound to a pod",
            ),
            (
                status(true, &[AUD], "system:serviceaccount:Shop:cart", Some("p")),
                "not a valid identity",
            ),
        ];
        for (s, want) in cases {
            match judge(&s, AUD, "cluster.local") {
                Err(ReviewError::Refused(why)) => assert!(why.contains(want), "{why}"),
                other => panic!("{want}: {other:?}"),
            }
        }
    }
}
