//! The shop's SQL: its catalog, carts and orders, over the store's connection. Each function
//! is one step that a handler or a job composes into a store transaction (`Store::transaction`
//! for writes, `Store::read` for reads) next to the store's generic primitives — the checkout
//! writes its order, its lines, the emptied cart and its payout job in one commit.
//!
//! Every function that reads or writes a user's records takes the user's id and filters by it:
//! there is no way to name another user's cart or order.

use crate::domain::{OrderId, Quantity, Sku};
use crate::flows::Effect;
use crate::Error;
use holdfast_store::{Backend, JobInsert, KeyStep, Keyed, Statement, Tx, TxError};
use serde::Serialize;
use sqlx::{AnyConnection, FromRow, Row};

/// Reads are generic in the caller's abort type; writes abort with the shop's [`Error`].
type Result<T, E = Error> = std::result::Result<T, TxError<E>>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct ProductRow {
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CartLine {
    pub sku: String,
    pub name: String,
    pub qty: i64,
    pub unit_price_cents: i64,
    pub line_total_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cart {
    pub items: Vec<CartLine>,
    pub total_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct OrderLine {
    pub sku: String,
    pub name: String,
    pub qty: i64,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct Order {
    #[sqlx(rename = "id")]
    pub order_id: String,
    pub total_cents: i64,
    pub status: String,
    pub created_at: i64,
    #[sqlx(skip)]
    pub items: Vec<OrderLine>,
}

/// What a payout and a receipt need to know about an order.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct PayoutInfo {
    #[sqlx(rename = "id")]
    pub order_id: String,
    pub email: String,
    pub total_cents: i64,
}

pub async fn product_list<E>(conn: &mut AnyConnection) -> Result<Vec<ProductRow>, E> {
    Ok(
        sqlx::query_as("SELECT sku, name, price_cents FROM products ORDER BY sku")
            .fetch_all(conn)
            .await?,
    )
}

/// The versions of the shop's schema that make up the change `cart_lines`: carts move from
/// `cart_items.qty` to `cart_lines.quantity` (see the migrations' own comments).
pub const CART_LINES_SWITCH_READS: i64 = 4;
pub const CART_LINES_SWITCH_WRITES: i64 = 5;
pub const CART_LINES_CONTRACT: i64 = 6;

/// A table a cart can live in while the change `cart_lines` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CartTable {
    /// `cart_items (qty)`: the shape before the change, and the only one an older build knows.
    Items,
    /// `cart_lines (quantity)`: the shape after it.
    Lines,
}

impl CartTable {
    fn table(self) -> &'static str {
        match self {
            CartTable::Items => "cart_items",
            CartTable::Lines => "cart_lines",
        }
    }

    fn quantity(self) -> &'static str {
        match self {
            CartTable::Items => "qty",
            CartTable::Lines => "quantity",
        }
    }
}

/// Where carts are read and written, as the phases of `cart_lines` applied so far say. Any
/// mix is correct while the expand's triggers keep both tables whole; the switches only move
/// which one is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CartShape {
    pub read: CartTable,
    pub write: CartTable,
}

impl CartShape {
    /// Before the change, and always for a build that does not know it.
    pub const OLD: CartShape = CartShape {
        read: CartTable::Items,
        write: CartTable::Items,
    };

    /// After the change: a database that ran its contract.
    pub const NEW: CartShape = CartShape {
        read: CartTable::Lines,
        write: CartTable::Lines,
    };

    /// The shape for a database that has applied `applied`, as seen by a build whose shop
    /// schema ends at version `known` (later versions are a newer build's, not this one's).
    pub fn from_applied(applied: &[i64], known: i64) -> CartShape {
        let has = |v: i64| v <= known && applied.contains(&v);
        let pick = |switch: i64| {
            if has(switch) || has(CART_LINES_CONTRACT) {
                CartTable::Lines
            } else {
                CartTable::Items
            }
        };
        CartShape {
            read: pick(CART_LINES_SWITCH_READS),
            write: pick(CART_LINES_SWITCH_WRITES),
        }
    }
}

/// The user's cart, priced from the catalog, from table `from`. `lock` is appended to the
/// query (a row lock).
pub async fn cart_read<E>(
    conn: &mut AnyConnection,
    user_id: &str,
    from: CartTable,
    lock: &str,
) -> Result<Cart, E> {
    let (table, quantity) = (from.table(), from.quantity());
    let rows = sqlx::query(&format!(
        "SELECT c.sku, p.name, c.{quantity} AS qty, p.price_cents FROM {table} c JOIN products p ON p.sku = c.sku
         WHERE c.user_id = $1 ORDER BY c.sku{lock}"
    ))
    .bind(user_id)
    .fetch_all(conn)
    .await?;
    cart_of_rows(&rows)
}

/// A cart from rows of `sku, name, qty, price_cents`, in their order.
fn cart_of_rows<E>(rows: &[sqlx::any::AnyRow]) -> Result<Cart, E> {
    let items = rows
        .iter()
        .map(|r| {
            let qty: i64 = r.try_get("qty")?;
            let unit: i64 = r.try_get("price_cents")?;
            Ok(CartLine {
                sku: r.try_get("sku")?,
                name: r.try_get("name")?,
                qty,
                unit_price_cents: unit,
                line_total_cents: qty * unit,
            })
        })
        .collect::<Result<Vec<_>, E>>()?;
    let total_cents = items.iter().map(|l| l.line_total_cents).sum();
    Ok(Cart { items, total_cents })
}

/// [`cart_add`] on PostgreSQL as one statement for `user` (an SQL expression of `stmt`, NULL
/// for a session the statement found dead; see `holdfast_web::Claim::user_in`): the product
/// looked up, the line added to (a line holds at most 99), and the cart as it now stands, read
/// from the lines the statement did not touch and the one it wrote (a statement does not see
/// its own writes). Adds the steps and returns the final `SELECT`: one row of flags and no line
/// when nothing was written; [`cart_from_added`] reads the answer.
pub fn cart_add_statement(
    stmt: &mut Statement,
    table: CartTable,
    user: &str,
    sku: &Sku,
    qty: Quantity,
) -> String {
    let (t, q) = (table.table(), table.quantity());
    let (sku, qty, now) = (
        stmt.bind(sku.as_str()),
        stmt.bind(qty.get()),
        stmt.bind(holdfast_core::now_ms()),
    );
    stmt.step(
        "known",
        &format!("SELECT sku FROM products WHERE sku = {sku} AND {user} IS NOT NULL"),
    );
    stmt.step(
        "added",
        &format!(
            "INSERT INTO {t} (user_id, sku, {q}, added_at) SELECT {user}, sku, {qty}, {now} FROM known
             ON CONFLICT (user_id, sku) DO UPDATE SET {q} = {t}.{q} + excluded.{q}
             WHERE {t}.{q} + excluded.{q} <= 99
             RETURNING sku, {q} AS qty"
        ),
    );
    format!(
        "SELECT flags.authed, flags.known, flags.added, line.sku, line.name, line.qty, line.price_cents
         FROM (SELECT ({user}) IS NOT NULL AS authed, (SELECT COUNT(*) FROM known) AS known,
                      (SELECT COUNT(*) FROM added) AS added) flags
         LEFT JOIN (
             SELECT c.sku, p.name, c.{q} AS qty, p.price_cents FROM {t} c JOIN products p ON p.sku = c.sku
             WHERE c.user_id = {user} AND c.sku <> {sku}
             UNION ALL
             SELECT a.sku, p.name, a.qty, p.price_cents FROM added a JOIN products p ON p.sku = a.sku
         ) line ON true
         ORDER BY line.sku"
    )
}

/// The cart [`cart_add_statement`]'s rows describe, or why nothing was added; `None` when
/// the statement found no live session (it wrote nothing).
pub fn cart_from_added(rows: &[sqlx::any::AnyRow], sku: &Sku) -> Result<Option<Cart>> {
    let flags = rows
        .first()
        .map(|r| -> std::result::Result<(bool, i64, i64), sqlx::Error> {
            Ok((
                r.try_get("authed")?,
                r.try_get("known")?,
                r.try_get("added")?,
            ))
        });
    match flags.transpose()? {
        Some((false, _, _)) => Ok(None),
        flags => cart_after_add(rows, sku, flags.map(|(_, known, added)| (known, added))).map(Some),
    }
}

/// The cart after an add, from the add's rows and its counts (how many products had the SKU,
/// how many lines were written), or why nothing was added.
fn cart_after_add(
    rows: &[sqlx::any::AnyRow],
    sku: &Sku,
    counts: Option<(i64, i64)>,
) -> Result<Cart> {
    match counts {
        Some((0, _)) | None => Err(TxError::Abort(Error::UnknownSku(sku.as_str().to_owned()))),
        Some((_, 0)) => Err(TxError::Abort(Error::QuantityLimit)),
        Some(_) => cart_of_rows(rows),
    }
}

/// A cart add's statement with its arguments: `$1` the user, `$2` the SKU, `$3` the quantity
/// added, `$4` the time.
fn added_line<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    user_id: &'q str,
    sku: &'q Sku,
    qty: Quantity,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    q.bind(user_id)
        .bind(sku.as_str())
        .bind(qty.get())
        .bind(holdfast_core::now_ms())
}

/// Adds `qty` of `sku` to the cart (a line holds at most 99); the cart as it now stands.
pub async fn cart_add(
    tx: &mut Tx,
    shape: CartShape,
    user_id: &str,
    sku: &Sku,
    qty: Quantity,
) -> Result<Cart> {
    if tx.backend() == Backend::Postgres && shape.read == shape.write {
        let mut stmt = Statement::new();
        let user = stmt.bind(user_id);
        let select = cart_add_statement(&mut stmt, shape.write, &user, sku, qty);
        let sql = stmt.selecting(&select);
        let rows = stmt.bound(&sql).fetch_all(tx.conn()).await?;
        if let Some(cart) = cart_from_added(&rows, sku)? {
            return Ok(cart);
        }
        // A user bound by id is never NULL, so the statement always answers; had it not, it
        // wrote nothing, and the steps below are the same add.
    }
    if tx.backend() == Backend::Sqlite && shape.read == shape.write {
        // One call of the connection's thread, not three (see `checkout_in_one_round_trip`):
        // the line written from the product's row, if there is one, then the cart as it now
        // stands beside how many products had the SKU and how many lines the add wrote
        // (`changes()`: none when the line would pass 99).
        let (t, q) = (shape.write.table(), shape.write.quantity());
        let sql = format!(
            "INSERT INTO {t} (user_id, sku, {q}, added_at) SELECT $1, sku, $3, $4 FROM products WHERE sku = $2
                 ON CONFLICT (user_id, sku) DO UPDATE SET {q} = {t}.{q} + excluded.{q}
                 WHERE {t}.{q} + excluded.{q} <= 99;
             SELECT flags.known, flags.added, line.sku, line.name, line.qty, line.price_cents
             FROM (SELECT (SELECT COUNT(*) FROM products WHERE sku = $2) AS known, changes() AS added) flags
             LEFT JOIN (
                 SELECT c.sku, p.name, c.{q} AS qty, p.price_cents FROM {t} c JOIN products p ON p.sku = c.sku
                 WHERE c.user_id = $1
             ) line ON true
             ORDER BY line.sku"
        );
        let rows = added_line(sqlx::query(&sql), user_id, sku, qty)
            .fetch_all(tx.conn())
            .await?;
        let counts = rows
            .first()
            .map(|r| -> std::result::Result<(i64, i64), sqlx::Error> {
                Ok((r.try_get("known")?, r.try_get("added")?))
            });
        return cart_after_add(&rows, sku, counts.transpose()?);
    }
    let known = sqlx::query("SELECT 1 AS one FROM products WHERE sku = $1")
        .bind(sku.as_str())
        .fetch_optional(tx.conn())
        .await?;
    if known.is_none() {
        return Err(TxError::Abort(Error::UnknownSku(sku.as_str().to_owned())));
    }
    let (t, q) = (shape.write.table(), shape.write.quantity());
    let sql = format!(
        "INSERT INTO {t} (user_id, sku, {q}, added_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (user_id, sku) DO UPDATE SET {q} = {t}.{q} + excluded.{q}
         WHERE {t}.{q} + excluded.{q} <= 99
         RETURNING {q}"
    );
    let row = added_line(sqlx::query(&sql), user_id, sku, qty)
        .fetch_optional(tx.conn())
        .await?;
    if row.is_none() {
        return Err(TxError::Abort(Error::QuantityLimit));
    }
    cart_read(tx.conn(), user_id, shape.read, "").await
}

/// Removes the line for `sku`; removing an absent line is not an error (DELETE is idempotent).
pub async fn cart_remove(tx: &mut Tx, shape: CartShape, user_id: &str, sku: &Sku) -> Result<Cart> {
    sqlx::query(&format!(
        "DELETE FROM {} WHERE user_id = $1 AND sku = $2",
        shape.write.table()
    ))
    .bind(user_id)
    .bind(sku.as_str())
    .execute(tx.conn())
    .await?;
    cart_read(tx.conn(), user_id, shape.read, "").await
}

/// Turns the cart into a pending order: the order, its lines, the emptied cart and the order's
/// payout job, all in the caller's transaction.
pub async fn checkout(tx: &mut Tx, shape: CartShape, user_id: &str) -> Result<Order> {
    if shape.read == shape.write {
        return checkout_in_one_round_trip(tx, shape.read, user_id).await;
    }
    let lock = match tx.backend() {
        Backend::Postgres => " FOR UPDATE OF c",
        Backend::Sqlite => "",
    };
    let cart = cart_read(tx.conn(), user_id, shape.read, lock).await?;
    if cart.items.is_empty() {
        return Err(TxError::Abort(Error::EmptyCart));
    }
    let order = Order {
        order_id: OrderId::generate().to_string(),
        total_cents: cart.total_cents,
        status: "pending".to_owned(),
        created_at: holdfast_core::now_ms(),
        items: cart
            .items
            .iter()
            .map(|l| OrderLine {
                sku: l.sku.clone(),
                name: l.name.clone(),
                qty: l.qty,
                unit_price_cents: l.unit_price_cents,
            })
            .collect(),
    };
    sqlx::query("INSERT INTO orders (id, user_id, total_cents, status, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(&order.order_id)
        .bind(user_id)
        .bind(order.total_cents)
        .bind(&order.status)
        .bind(order.created_at)
        .execute(tx.conn())
        .await?;
    for l in &order.items {
        sqlx::query("INSERT INTO order_items (order_id, sku, name, qty, unit_price_cents) VALUES ($1, $2, $3, $4, $5)")
            .bind(&order.order_id)
            .bind(&l.sku)
            .bind(&l.name)
            .bind(l.qty)
            .bind(l.unit_price_cents)
            .execute(tx.conn())
            .await?;
    }
    // Delete exactly the lines read (and on Postgres locked) above, not the whole cart: under
    // READ COMMITTED a line another transaction added since is visible to a later statement,
    // is not in this order, and must stay in the cart.
    let delete = format!(
        "DELETE FROM {} WHERE user_id = $1 AND sku = $2",
        shape.write.table()
    );
    for l in &order.items {
        sqlx::query(&delete)
            .bind(user_id)
            .bind(&l.sku)
            .execute(tx.conn())
            .await?;
    }
    // The payout job exists if and only if the order does.
    let email: String = sqlx::query("SELECT email FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_one(tx.conn())
        .await?
        .try_get("email")?;
    tx.job_enqueue(&[payout_job(&order, email)]).await?;
    Ok(order)
}

/// [`checkout`] in one round trip instead of two plus two per line, the cart read once.
///
/// On Postgres one statement locks the cart's lines, writes the order and its lines, deletes
/// exactly the lines it locked (a line added meanwhile stays) and returns what it took; the
/// payout job is a second. On SQLite it is one script ([`sqlite_checkout_writes`], the payout
/// job among them, then the order's lines read back). Either way an empty cart writes
/// nothing, and the rows are the order's lines by SKU, each with the user's email.
async fn checkout_in_one_round_trip(tx: &mut Tx, table: CartTable, user_id: &str) -> Result<Order> {
    let (order_id, created_at) = (OrderId::generate().to_string(), holdfast_core::now_ms());
    let mut stmt = Statement::new();
    let user = stmt.bind(user_id);
    let sql = match tx.backend() {
        Backend::Postgres => {
            let (t, q) = (table.table(), table.quantity());
            let (order, created) = (stmt.bind(order_id.as_str()), stmt.bind(created_at));
            format!(
                "WITH cart AS (
                     SELECT c.sku, p.name, c.{q} AS qty, p.price_cents FROM {t} c JOIN products p ON p.sku = c.sku
                     WHERE c.user_id = {user} FOR UPDATE OF c
                 ), placed AS (
                     INSERT INTO orders (id, user_id, total_cents, status, created_at)
                     SELECT {order}, {user}, SUM(qty * price_cents), 'pending', {created} FROM cart HAVING COUNT(*) > 0
                     RETURNING id
                 ), lines AS (
                     INSERT INTO order_items (order_id, sku, name, qty, unit_price_cents)
                     SELECT placed.id, cart.sku, cart.name, cart.qty, cart.price_cents FROM cart, placed
                 ), emptied AS (
                     DELETE FROM {t} d USING cart, placed WHERE d.user_id = {user} AND d.sku = cart.sku
                 )
                 SELECT sku, name, qty, price_cents, (SELECT email FROM users WHERE id = {user}) AS email
                 FROM cart ORDER BY sku"
            )
        }
        Backend::Sqlite => {
            let (writes, order) =
                sqlite_checkout_writes(&mut stmt, table, &user, (&order_id, created_at), "");
            format!(
                "{writes};
                 SELECT i.sku, i.name, i.qty, i.unit_price_cents AS price_cents, u.email
                 FROM order_items i JOIN users u ON u.id = {user} WHERE i.order_id = {order} ORDER BY i.sku"
            )
        }
    };
    let rows = stmt.bound(&sql).fetch_all(tx.conn()).await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(OrderLine {
                sku: r.try_get("sku")?,
                name: r.try_get("name")?,
                qty: r.try_get("qty")?,
                unit_price_cents: r.try_get("price_cents")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = rows.first() else {
        return Err(TxError::Abort(Error::EmptyCart));
    };
    let email: String = first.try_get("email")?;
    let order = Order {
        order_id,
        total_cents: items.iter().map(|l| l.qty * l.unit_price_cents).sum(),
        status: "pending".to_owned(),
        created_at,
        items,
    };
    if tx.backend() == Backend::Postgres {
        tx.job_enqueue(&[payout_job(&order, email)]).await?;
    }
    Ok(order)
}

/// The SQLite checkout's writes, as the statements of one script: the order of `user` (an SQL
/// expression of `stmt`) with the given id and creation time, written only where `gate`
/// (` AND …`, or nothing) holds; its lines, the emptied cart and its payout job, each derived
/// from the order just written, so that an empty cart or a closed gate writes nothing. Also
/// the order id's placeholder, for what the caller appends.
///
/// SQLite has no data-modifying `WITH`; the driver runs a script in one call, and on SQLite a
/// call is a turn of the connection's thread taken while this process holds the database's one
/// write lock, so every one saved is time every other process waits less. The write
/// transaction excludes every other writer, so the statements after the order's insert read
/// the same cart it did.
fn sqlite_checkout_writes(
    stmt: &mut Statement,
    table: CartTable,
    user: &str,
    (order_id, created_at): (&str, i64),
    gate: &str,
) -> (String, String) {
    let (t, q) = (table.table(), table.quantity());
    let (order, created) = (stmt.bind(order_id), stmt.bind(created_at));
    // The payout job, carrying what `payout_job` puts in it.
    let payout = stmt.job_insert_computed(
        &Effect::Charge.job(order_id),
        "json_object('order_id', o.id, 'email', u.email, 'total_cents', o.total_cents)",
        &format!("orders o JOIN users u ON u.id = o.user_id WHERE o.id = {order}"),
    );
    let writes = format!(
        "INSERT INTO orders (id, user_id, total_cents, status, created_at)
             SELECT {order}, {user}, SUM(c.{q} * p.price_cents), 'pending', {created}
             FROM {t} c JOIN products p ON p.sku = c.sku WHERE c.user_id = {user}{gate} GROUP BY c.user_id;
         INSERT INTO order_items (order_id, sku, name, qty, unit_price_cents)
             SELECT o.id, c.sku, p.name, c.{q}, p.price_cents
             FROM orders o JOIN {t} c ON c.user_id = o.user_id JOIN products p ON p.sku = c.sku
             WHERE o.id = {order};
         DELETE FROM {t} WHERE user_id = {user} AND sku IN (SELECT sku FROM order_items WHERE order_id = {order});
         {payout}"
    );
    (writes, order)
}

/// The whole keyed checkout as one statement (see `holdfast_web::Claim::in_one_statement`):
/// the checkout's writes, gated on the key's absence, and the key stored done with the answer
/// the database renders from what was written: the bytes [`Order`]'s JSON serialization gives
/// (a test per engine holds the two to it), so that a replay answers exactly what the first
/// request got. The payout job and its order are written together. On PostgreSQL
/// ([`checkout_steps`]) every write descends from the read of the cart of `key.user`, which is
/// NULL for a session the statement found dead: then there is no cart, and nothing is
/// written. On SQLite ([`sqlite_checkout_writes`]) the user was read before. `None` while the
/// cart's table is being moved (reads and writes name different tables).
pub fn checkout_statement(
    stmt: &mut Statement,
    key: KeyStep<'_>,
    shape: CartShape,
) -> Option<Keyed> {
    if shape.read != shape.write {
        return None;
    }
    let order_id = OrderId::generate().to_string();
    if key.backend == Backend::Postgres {
        return Some(checkout_steps(stmt, &key, shape.read, order_id));
    }
    let absent = stmt.key_absent(&key);
    let (writes, order) = sqlite_checkout_writes(
        stmt,
        shape.read,
        &key.user,
        (&order_id, holdfast_core::now_ms()),
        &format!(" AND {absent}"),
    );
    // The order as serde writes it: fields in declaration order, lines by SKU, no spaces.
    let answer = "json_object('order_id', o.id, 'total_cents', o.total_cents, 'status', o.status,
                              'created_at', o.created_at, 'items', json((
             SELECT json_group_array(json_object('sku', i.sku, 'name', i.name, 'qty', i.qty,
                                                 'unit_price_cents', i.unit_price_cents) ORDER BY i.sku)
             FROM order_items i WHERE i.order_id = o.id)))";
    let stored = stmt.store_key(&key, 201, answer, &format!("orders o WHERE o.id = {order}"));
    Some(Keyed::Script(format!("{writes}; {stored}")))
}

/// [`checkout_statement`]'s steps on PostgreSQL.
fn checkout_steps(
    stmt: &mut Statement,
    key: &KeyStep<'_>,
    table: CartTable,
    order_id: String,
) -> Keyed {
    let (t, q) = (table.table(), table.quantity());
    let payout = Effect::Charge.job(&order_id);
    let user = key.user.clone();
    let (order, created) = (stmt.bind(order_id), stmt.bind(holdfast_core::now_ms()));
    stmt.step(
        "cart",
        &format!(
            "SELECT c.sku, p.name, c.{q} AS qty, p.price_cents FROM {t} c JOIN products p ON p.sku = c.sku
             WHERE c.user_id = {user} FOR UPDATE OF c"
        ),
    );
    stmt.step(
        "summed",
        "SELECT SUM(qty * price_cents) AS total_cents,
                string_agg('{\"sku\":' || to_json(sku)::text || ',\"name\":' || to_json(name)::text
                           || ',\"qty\":' || qty || ',\"unit_price_cents\":' || price_cents || '}', ',' ORDER BY sku) AS items
         FROM cart HAVING COUNT(*) > 0",
    );
    let answer = format!(
        "'{{\"order_id\":' || to_json({order}::text)::text || ',\"total_cents\":' || total_cents
         || ',\"status\":\"pending\",\"created_at\":' || {created} || ',\"items\":[' || items || ']}}'"
    );
    stmt.claim_key("key", key, 201, &answer, "summed");
    stmt.step(
        "placed",
        &format!(
            "INSERT INTO orders (id, user_id, total_cents, status, created_at)
             SELECT {order}, {user}, summed.total_cents, 'pending', {created} FROM summed, key RETURNING id"
        ),
    );
    stmt.step(
        "lines",
        "INSERT INTO order_items (order_id, sku, name, qty, unit_price_cents)
         SELECT placed.id, cart.sku, cart.name, cart.qty, cart.price_cents FROM cart, placed",
    );
    stmt.step(
        "emptied",
        &format!(
            "DELETE FROM {t} d USING cart, placed WHERE d.user_id = {user} AND d.sku = cart.sku"
        ),
    );
    // The payout carries the total and the buyer's address, as `payout_job` writes them.
    let args = format!(
        "json_build_object('order_id', placed.id, 'email', (SELECT email FROM users WHERE id = {user}),
                           'total_cents', summed.total_cents)::text"
    );
    stmt.enqueue_job_computed("payout", &payout, &args, "placed, summed");
    Keyed::Step("key".to_owned())
}

/// The job that charges `order` (unique per order), carrying its total and the buyer's
/// address, so that its worker reads nothing before it charges.
fn payout_job(order: &Order, email: String) -> JobInsert {
    Effect::Charge.job_carrying(&PayoutInfo {
        order_id: order.order_id.clone(),
        email,
        total_cents: order.total_cents,
    })
}

/// Where a page of orders starts: after the order created at `created_at` with id `id`
/// (orders are listed newest first, ties by id), or at the newest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrdersAfter {
    pub created_at: i64,
    pub id: String,
}

impl OrdersAfter {
    /// The start of the list.
    pub fn newest() -> Self {
        Self {
            created_at: i64::MAX,
            id: String::new(),
        }
    }
}

/// Orders after `after`: newest first, at most `limit`, each with its lines.
pub async fn order_list<E>(
    conn: &mut AnyConnection,
    user_id: &str,
    after: &OrdersAfter,
    limit: i64,
) -> Result<Vec<Order>, E> {
    // One round trip: the page's orders joined with their lines, an order's rows adjacent.
    let rows = sqlx::query(
        "SELECT o.id, o.total_cents, o.status, o.created_at, i.sku, i.name, i.qty, i.unit_price_cents
         FROM (SELECT id FROM orders WHERE user_id = $1
               AND (created_at < $2 OR (created_at = $2 AND id > $3))
               ORDER BY created_at DESC, id LIMIT $4) p
         JOIN orders o ON o.id = p.id
         JOIN order_items i ON i.order_id = o.id
         ORDER BY o.created_at DESC, o.id, i.sku",
    )
    .bind(user_id)
    .bind(after.created_at)
    .bind(&after.id)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut orders: Vec<Order> = Vec::new();
    for r in &rows {
        let id: String = r.try_get("id")?;
        if orders.last().is_none_or(|o| o.order_id != id) {
            orders.push(Order::from_row(r)?);
        }
        if let Some(o) = orders.last_mut() {
            o.items.push(OrderLine::from_row(r)?);
        }
    }
    Ok(orders)
}

/// One order, only if it belongs to `user_id`: another user's order is indistinguishable from
/// a missing one.
pub async fn order_get<E>(
    conn: &mut AnyConnection,
    user_id: &str,
    order_id: &OrderId,
) -> Result<Option<Order>, E> {
    let head =
        "SELECT id, total_cents, status, created_at FROM orders WHERE id = $1 AND user_id = $2";
    let Some(mut order) = sqlx::query_as::<_, Order>(head)
        .bind(order_id.as_str())
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let lines =
        "SELECT sku, name, qty, unit_price_cents FROM order_items WHERE order_id = $1 ORDER BY sku";
    order.items = sqlx::query_as(lines)
        .bind(order_id.as_str())
        .fetch_all(&mut *conn)
        .await?;
    Ok(Some(order))
}

/// What the payout of `order_id` needs, whoever owns it (the worker acts for the shop).
pub async fn payout_info<E>(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<PayoutInfo>, E> {
    Ok(sqlx::query_as(
        "SELECT o.id, u.email, o.total_cents FROM orders o JOIN users u ON u.id = o.user_id WHERE o.id = $1",
    )
    .bind(order_id)
    .fetch_optional(conn)
    .await?)
}

/// "The order is paid": a pending order becomes paid (a paid one stays paid).
pub async fn order_mark_paid(tx: &mut Tx, order_id: &str) -> std::result::Result<(), sqlx::Error> {
    sqlx::query("UPDATE orders SET status = 'paid' WHERE id = $1 AND status = 'pending'")
        .bind(order_id)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// [`order_mark_paid`] as the step `name` of a composed statement, done only if the step
/// `after` returned a row.
pub fn order_mark_paid_step(stmt: &mut Statement, name: &str, order_id: &str, after: &str) {
    let id = stmt.bind(order_id);
    stmt.step(
        name,
        &format!(
            "UPDATE orders SET status = 'paid' WHERE id = {id} AND status = 'pending' AND EXISTS (SELECT 1 FROM {after}) RETURNING id"
        ),
    );
}
