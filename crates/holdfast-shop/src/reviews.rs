//! Video reviews: what the shop lets a user upload. An upload is a review of one product the
//! user has ordered, named by the `sku` key of its tus `Upload-Metadata`; its subject is
//! `review:<sku>`. Uploading, listing, downloading and deleting are `holdfast-uploads`'.

use async_trait::async_trait;
use holdfast_store::{ScopedFutureExt, Store, TxError};
use holdfast_uploads::{Attach, Metadata};
use holdfast_web::AppError;
use std::convert::Infallible;

/// The shop's [`Attach`] rule: a review of a product the user ordered.
pub struct Reviews;

#[async_trait]
impl Attach for Reviews {
    async fn subject(
        &self,
        store: &Store,
        user: &str,
        metadata: &Metadata,
    ) -> Result<String, AppError> {
        let Some(sku) = metadata.get("sku").filter(|s| !s.is_empty()) else {
            return Err(AppError::unprocessable(
                "review-needs-sku",
                "an upload is a video review: name the product in Upload-Metadata as `sku`",
            ));
        };
        let ordered = store
            .read("review_ordered", |c| {
                async move {
                    let found: Option<i64> = sqlx::query_scalar(
                        "SELECT 1 FROM orders o JOIN order_items i ON i.order_id = o.id \
                         WHERE o.user_id = $1 AND i.sku = $2 LIMIT 1",
                    )
                    .bind(user)
                    .bind(sku)
                    .fetch_optional(c)
                    .await?;
                    Ok::<_, TxError<Infallible>>(found.is_some())
                }
                .scope_boxed()
            })
            .await?;
        if !ordered {
            return Err(AppError::unprocessable(
                "review-not-ordered",
                format!("you can review only what you ordered, and no order of yours has {sku}"),
            ));
        }
        Ok(format!("review:{sku}"))
    }
}
