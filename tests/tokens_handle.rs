//! `Tokens`, the one handle that issues tokens: what it issues, the layer built from it and the
//! management API built from it accept; a layer made with another format or hasher cannot be
//! paired with it.

mod support_admin;

use axum::Router;
use axum::routing::get;
use http::StatusCode;
use support_admin::{BASE, create, hello};
use tower_pat::admin::{self, AdminConfig};
use tower_pat::{
    LayerMismatch, MemoryStore, NewToken, PatAuthLayer, Principal, ScopeSet, TokenFormat,
    TokenHasher, Tokens,
};

/// A handle with a pepper and a product prefix, as a deployment would configure it: a layer that
/// silently kept the defaults would refuse every token it issues.
fn peppered() -> Tokens {
    Tokens::new(MemoryStore::new())
        .with_format(TokenFormat::with_prefix("acme_pat_").unwrap())
        .with_hasher(TokenHasher::with_pepper("pepper-1").with_previous_peppers([""]))
}

/// The app: the management API and `/hello`, both behind the layer built from `tokens`.
fn app(tokens: &Tokens, layer: &PatAuthLayer) -> Router {
    Router::new()
        .nest(
            BASE,
            admin::router(AdminConfig::new(tokens, layer).expect("the layer is the handle's")),
        )
        .route(
            "/hello",
            get(|p: Principal| async move { p.subject().to_owned() }),
        )
        .layer(layer.clone())
}

#[tokio::test]
async fn a_token_issued_through_the_handle_authenticates_through_its_layer() {
    let tokens = peppered();
    let layer = tokens.layer().build();
    let (record, secret) = tokens
        .issue(
            NewToken::new("alice", "laptop")
                .scopes(["repo:read"])
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(secret.expose_secret().starts_with("acme_pat_"));
    // The store keeps the peppered hash, never the plain SHA-256 of the secret.
    assert_eq!(record.hash, tokens.hasher().hash(secret.expose_secret()));
    assert_ne!(
        record.hash,
        TokenHasher::sha256().hash(secret.expose_secret())
    );
    assert_eq!(tokens.get(&record.id).await.unwrap(), Some(record.clone()));

    let required = ScopeSet::parse(["repo:read"]).unwrap();
    let principal = layer
        .verify(secret.expose_secret(), None, &required)
        .await
        .expect("the handle's layer accepts the handle's token");
    assert_eq!(principal.subject(), "alice");
    assert_eq!(principal.token_id(), record.id);

    // Over HTTP too; and a revocation through the handle reaches the layer before it returns.
    let app = app(&tokens, &layer);
    assert_eq!(hello(&app, secret.expose_secret()).await, StatusCode::OK);
    assert!(tokens.revoke(&record.id).await.unwrap().is_some());
    assert_eq!(
        hello(&app, secret.expose_secret()).await,
        StatusCode::UNAUTHORIZED
    );
    // A name is unique per subject: the handle reports the store's conflict.
    let again = tokens.issue(NewToken::new("alice", "laptop")).await;
    assert!(
        matches!(
            again,
            Err(tower_pat::StoreError::Conflict { field: "name" })
        ),
        "{again:?}"
    );
}

#[tokio::test]
async fn the_admin_api_built_from_the_handle_issues_tokens_the_layer_accepts() {
    let tokens = peppered();
    let layer = tokens.layer().build();
    let app = app(&tokens, &layer);
    let (_, manager) = tokens
        .issue(
            NewToken::new("alice", "manager")
                .scopes(["personalAccessToken:*"])
                .unwrap(),
        )
        .await
        .unwrap();
    let created = create(
        &app,
        manager.expose_secret(),
        r#"{"name": "ci", "userAwareTokenNeverExpires": true}"#,
    )
    .await;
    let secret = created.body["token"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("acme_pat_"), "{secret}");
    assert_eq!(hello(&app, &secret).await, StatusCode::OK);
    // The handle sees what the API stored.
    let id = created.body["id"].as_str().unwrap();
    let stored = tokens.get(id).await.unwrap().unwrap();
    assert_eq!(stored.hash, tokens.hasher().hash(&secret));
    let listed = tokens
        .list(&tower_pat::store::ListQuery::for_subject("alice").search("ci"))
        .await
        .unwrap();
    assert_eq!(listed.total, 1);
    assert_eq!(listed.items[0].id, id);

    // A rotated secret is the handle's too.
    let rotated = support_admin::post(
        &app,
        &format!("{BASE}/{id}/rotate"),
        manager.expose_secret(),
        "",
    )
    .await;
    assert!(rotated.status.is_success(), "{}", rotated.text);
    let fresh = rotated.body["token"].as_str().unwrap();
    assert_eq!(hello(&app, fresh).await, StatusCode::OK);
    assert_eq!(hello(&app, &secret).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_layer_with_another_hasher_or_format_is_refused() {
    let tokens = peppered();
    let store = tokens.store().clone();
    // Built by hand over the same store, with the defaults: the mistake the handle exists to stop.
    let by_hand = PatAuthLayer::builder(store.clone()).build();
    assert_eq!(
        AdminConfig::new(&tokens, &by_hand).err(),
        Some(LayerMismatch::Format)
    );
    let same_prefix = PatAuthLayer::builder(store.clone())
        .format(tokens.format().clone())
        .build();
    assert_eq!(
        AdminConfig::new(&tokens, &same_prefix).err(),
        Some(LayerMismatch::Hasher)
    );
    // From the handle's builder, a hasher set over the handle's is refused too: another pepper,
    // or the same pepper without the previous ones.
    for hasher in [
        TokenHasher::with_pepper("pepper-2").with_previous_peppers([""]),
        TokenHasher::with_pepper("pepper-1"),
        TokenHasher::sha256(),
    ] {
        let layer = tokens.layer().hasher(hasher).build();
        assert_eq!(tokens.check_layer(&layer), Err(LayerMismatch::Hasher));
        assert!(AdminConfig::new(&tokens, &layer).is_err());
    }
    let layer = tokens.layer().format(TokenFormat::new()).build();
    assert_eq!(tokens.check_layer(&layer), Err(LayerMismatch::Format));

    // And the refusal is right: such a layer refuses the handle's tokens.
    let (_, secret) = tokens
        .issue(NewToken::new("alice", "laptop"))
        .await
        .unwrap();
    let wrong = tokens.layer().hasher(TokenHasher::sha256()).build();
    let verdict = wrong
        .verify(secret.expose_secret(), None, &ScopeSet::empty())
        .await;
    assert!(verdict.is_err());

    // The same configuration, built separately, pairs: equal peppers make equal hashes.
    let twin = PatAuthLayer::builder(store)
        .format(TokenFormat::with_prefix("acme_pat_").unwrap())
        .hasher(TokenHasher::with_pepper("pepper-1").with_previous_peppers([""]))
        .build();
    assert_eq!(tokens.check_layer(&twin), Ok(()));
    // Neither the handle's Debug nor the error names the pepper.
    let shown = format!("{tokens:?} {}", LayerMismatch::Hasher);
    assert!(!shown.contains("pepper-1"), "{shown}");
}
