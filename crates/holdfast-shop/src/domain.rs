//! The shop's own values, parsed at the boundary: a product code, a quantity, an order id.

use holdfast_core::ParseError;
use std::fmt;

/// A product code from the catalog's alphabet (whether it exists is the store's to say).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Sku(String);

impl Sku {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(ParseError::new(
                "sku",
                "must be 1 to 64 of A-Z, 0-9 and '-'",
            ))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How many of one item to add to a cart: 1 to 99.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Quantity(u8);

impl Quantity {
    pub const MAX: i64 = 99;
    pub fn parse(raw: i64) -> Result<Self, ParseError> {
        if (1..=Self::MAX).contains(&raw) {
            Ok(Self(raw as u8))
        } else {
            Err(ParseError::new("qty", "must be an integer from 1 to 99"))
        }
    }
    pub fn get(self) -> i64 {
        i64::from(self.0)
    }
}

/// An order's id: a UUID.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct OrderId(String);

impl OrderId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        uuid::Uuid::parse_str(raw)
            .map(|u| Self(u.to_string()))
            .map_err(|_| ParseError::new("order_id", "must be a UUID"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quantity_sku_and_order_id_bounds() {
        assert!(
            Quantity::parse(0).is_err()
                && Quantity::parse(-1).is_err()
                && Quantity::parse(100).is_err()
        );
        assert_eq!(Quantity::parse(99).unwrap().get(), 99);
        assert!(
            Sku::parse("ROPE-10M").is_ok()
                && Sku::parse("rope").is_err()
                && Sku::parse("").is_err()
                && Sku::parse(&"A".repeat(65)).is_err()
        );
        let id = OrderId::generate();
        assert_eq!(OrderId::parse(id.as_str()).unwrap(), id);
        assert!(OrderId::parse("not-a-uuid").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,300}", n in any::<i64>()) {
            let _ = Sku::parse(&s);
            let _ = OrderId::parse(&s);
            let _ = Quantity::parse(n);
        }
    }
}
