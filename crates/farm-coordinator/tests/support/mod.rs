//! A database of its own for each store test.

use farm_coordinator::store::Store;

pub struct TestDb {
    url: String,
    pub store: Store,
}

impl TestDb {
    /// A fresh database named `{prefix}_{random}` on the Postgres at 127.0.0.1:5432.
    pub async fn new(prefix: &str) -> TestDb {
        let name = format!(
            "{prefix}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        let store = Store::connect(&url)
            .await
            .expect("postgres on 127.0.0.1:5432");
        TestDb { url, store }
    }

    pub async fn drop_db(self) {
        drop(self.store);
        let _ = Store::drop_database(&self.url).await;
    }
}
