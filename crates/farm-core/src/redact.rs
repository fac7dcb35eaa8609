//! Secrets stay out of messages and logs: URLs are shown with their password masked.

/// `scheme://user:password@host/...` → `scheme://user:***@host/...`; anything else unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    let user = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        // `redis://:password@host` and `redis://token@host` carry a secret too.
        None if scheme.starts_with("redis") => "***".to_string(),
        None => userinfo.to_string(),
    };
    format!("{scheme}://{user}@{host}{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            redact_url("postgres://farm:s3cret@db:5432/farm?sslmode=require"),
            "postgres://farm:***@db:5432/farm?sslmode=require"
        );
        assert_eq!(
            redact_url("rediss://:tok@cache:6380"),
            "rediss://:***@cache:6380"
        );
        assert_eq!(redact_url("redis://tok@cache"), "redis://***@cache");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/farm"),
            "postgres://postgres@127.0.0.1/farm"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
