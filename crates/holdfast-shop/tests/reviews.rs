//! Video reviews: the shop's rule for what a user may upload (a review of a product they
//! ordered), on top of `holdfast-uploads` (whose own tests cover tus itself).

use axum::http::StatusCode;
use holdfast_shop::CATALOG;
use holdfast_testkit::app::{local, spawn_app, TestApp};
use holdfast_testkit::uploads::creation;

/// `Upload-Metadata` naming `sku` (base64, as tus wants it).
fn review_of(sku: &str) -> String {
    use base64::Engine;
    format!(
        "sku {}",
        base64::engine::general_purpose::STANDARD.encode(sku)
    )
}

async fn create(app: &TestApp, cookie: &str, metadata: &str) -> holdfast_testkit::app::Reply {
    app.send(creation(cookie, 5, metadata)).await
}

#[tokio::test]
async fn a_review_is_of_a_product_the_user_ordered() {
    let app = spawn_app(local()).await;
    let buyer = app.user("buyer@example.com").await;
    let stranger = app.user("stranger@example.com").await;
    let (ordered, other) = (CATALOG[0].sku, CATALOG[1].sku);

    let r = create(&app, &buyer, "").await;
    assert_eq!(
        r.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a review names its product"
    );
    assert!(r.is_problem());
    let r = create(&app, &buyer, &review_of(ordered)).await;
    assert_eq!(
        r.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not ordered yet"
    );
    assert_eq!(
        r.json()["type"]
            .as_str()
            .map(|t| t.ends_with("review-not-ordered")),
        Some(true)
    );

    assert_eq!(app.add(&buyer, ordered, 1).await.status, StatusCode::OK);
    assert_eq!(
        app.checkout(&buyer, "review-order-1").await.status,
        StatusCode::CREATED
    );
    let r = create(&app, &buyer, &review_of(ordered)).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        create(&app, &buyer, &review_of(other)).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        create(&app, &stranger, &review_of(ordered)).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    let listed = app
        .call("GET", "/api/uploads", None, Some(&buyer), &[])
        .await
        .json();
    assert_eq!(listed["uploads"][0]["subject"], format!("review:{ordered}"));
    let theirs = app
        .call("GET", "/api/uploads", None, Some(&stranger), &[])
        .await
        .json();
    assert_eq!(theirs["uploads"].as_array().map(Vec::len), Some(0));
}
