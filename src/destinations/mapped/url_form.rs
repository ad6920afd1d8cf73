//! A rendered URL taken as it is, without a URL parser, when the parser would give it
//! back unchanged: the template's literal start is checked once at load (an http(s) URL
//! written as a parser writes it, up into its path), and what the slots add is only
//! characters a path keeps as they are.

/// What is known at load of an action's URL template.
#[derive(Debug)]
pub enum UrlForm {
    /// No slot: the URL as a parser writes it.
    Fixed(String),
    /// The literal start before the first slot, up into the path.
    Prefix {
        prefix: String,
        at_segment_start: bool,
    },
    /// Every rendered URL is parsed.
    Parse,
}

impl UrlForm {
    pub fn new(template: &str) -> UrlForm {
        let slot = ["{{", "{%", "{#"]
            .iter()
            .filter_map(|t| template.find(t))
            .min();
        let Some(end) = slot else {
            return match http_url(template) {
                Some(url) => UrlForm::Fixed(url.into()),
                None => UrlForm::Parse,
            };
        };
        let prefix = &template[..end];
        // Written as a parser writes it, an http(s) URL has a path: the slots add to it.
        let kept = http_url(prefix).is_some_and(|url| {
            url.as_str() == prefix && url.query().is_none() && url.fragment().is_none()
        });
        // The path segment the slot continues: a parser reads `.`, `..` and their encoded
        // forms there as steps up; one that starts with a letter or digit is none of them.
        let tail = &prefix[prefix.rfind('/').map_or(0, |i| i + 1)..];
        let plain_tail = tail
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric());
        match kept && plain_tail {
            true => UrlForm::Prefix {
                prefix: prefix.to_string(),
                at_segment_start: tail.is_empty(),
            },
            false => UrlForm::Parse,
        }
    }

    /// The URL `rendered` (from this template) stands for, when known without parsing it;
    /// `Err` gives it back to be parsed.
    pub fn known(&self, rendered: String) -> Result<String, String> {
        match self {
            UrlForm::Fixed(url) => Ok(url.clone()),
            UrlForm::Prefix {
                prefix,
                at_segment_start,
            } => {
                let Some(rest) = rendered.strip_prefix(prefix.as_str()) else {
                    return Err(rendered);
                };
                let mut segments = rest.split('/');
                let first = segments.next().unwrap_or("");
                let dots = |s: &str| s == "." || s == "..";
                let kept = rest.bytes().all(path_keeps)
                    && !(*at_segment_start && dots(first))
                    && !segments.any(dots);
                if kept {
                    Ok(rendered)
                } else {
                    Err(rendered)
                }
            }
            UrlForm::Parse => Err(rendered),
        }
    }
}

/// `text` parsed, if it is an http(s) URL.
fn http_url(text: &str) -> Option<url::Url> {
    url::Url::parse(text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
}

/// A byte a URL path keeps as it is (RFC 3986's `pchar` without `%`, and `/`).
fn path_keeps(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What `send` makes of a rendered URL when it parses it.
    fn parsed(rendered: &str) -> Option<String> {
        http_url(rendered).map(String::from)
    }

    #[test]
    fn a_slot_in_the_path_needs_no_parser() {
        let form = UrlForm::new("http://127.0.0.1:9/v1/events/{{ userId }}");
        let url = "http://127.0.0.1:9/v1/events/user-1.x";
        assert_eq!(form.known(url.into()), Ok(url.into()));
        for url in [
            "http://127.0.0.1:9/v1/events/a b",
            "http://127.0.0.1:9/v1/events/..",
            "http://127.0.0.1:9/v1/events/a/./b",
            "http://127.0.0.1:9/v1/events/%2e",
            "http://127.0.0.1:9/v1/events/a?b",
            "http://127.0.0.1:9/v1/events/a#b",
            "http://127.0.0.1:9/v1/events/é",
            "http://other/",
        ] {
            assert_eq!(form.known(url.into()), Err(url.into()), "{url}");
        }
        assert_eq!(
            UrlForm::new("HTTP://Host").known("HTTP://Host".into()),
            Ok("http://host/".into())
        );
        for template in [
            "http://h:80/{{ a }}",
            "http://h{{ a }}",
            "{{ a }}",
            "http://h/?a={{ a }}",
            "http://h/.{{ a }}",
            "http://h/%2{{ a }}",
            "ftp://h/{{ a }}",
            "not a URL",
        ] {
            assert!(
                matches!(UrlForm::new(template), UrlForm::Parse),
                "{template}"
            );
        }
    }

    proptest! {
        /// A URL taken without parsing is the one the parser gives.
        #[test]
        fn what_it_keeps_the_parser_gives(
            prefix in prop::sample::select(vec![
                "http://h/", "http://h/a", "https://u@h:8443/v1/x.", "http://h/a/", "http://h",
            ]),
            rest in prop_oneof![
                r"[a-zA-Z0-9./%?#~!$&'()*+,;=:@ \\-]{0,10}",
                // Whole segments, the ones a parser rewrites among them.
                prop::collection::vec(
                    prop::sample::select(vec!["a", "", ".", "..", "%2e", ".%2E", "x y", "é", "?q", "#f"]),
                    0..4,
                )
                .prop_map(|segments| segments.join("/")),
            ],
        ) {
            let form = UrlForm::new(&format!("{prefix}{{{{ x }}}}"));
            let rendered = format!("{prefix}{rest}");
            if let Ok(url) = form.known(rendered.clone()) {
                prop_assert_eq!(Some(url), parsed(&rendered));
            }
        }
    }
}
