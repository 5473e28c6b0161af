//! Request paths of the Kubernetes API, parsed into what they address.

use super::resources::{self, Resource};

#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    Version,
    Health,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/<group>`
    Group(String),
    /// `/api/v1`, `/apis/<group>/<version>`
    ResourceList {
        group: String,
        version: String,
    },
    /// `/openapi/v3`
    OpenApiRoot,
    /// `/openapi/v3/api/v1`, `/openapi/v3/apis/<group>/<version>`
    OpenApi {
        group: String,
        version: String,
    },
    Object(Target),
}

/// A resource path: a collection, an object, or an object's subresource.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub res: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

/// `None` for a path the server does not serve (404).
pub fn parse(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => Some(Route::Version),
        ["healthz" | "readyz" | "livez", ..] => Some(Route::Health),
        ["api"] => Some(Route::CoreVersions),
        ["apis"] => Some(Route::Groups),
        ["apis", g] => resources::GROUPS.contains(g).then(|| Route::Group((*g).to_owned())),
        ["openapi", "v3"] => Some(Route::OpenApiRoot),
        ["openapi", "v3", "api", v] => Some(Route::OpenApi { group: String::new(), version: (*v).to_owned() }),
        ["openapi", "v3", "apis", g, v] => Some(Route::OpenApi { group: (*g).to_owned(), version: (*v).to_owned() }),
        ["api", v, rest @ ..] => in_group_version("", v, rest),
        ["apis", g, v, rest @ ..] => in_group_version(g, v, rest),
        _ => None,
    }
}

fn in_group_version(group: &str, version: &str, rest: &[&str]) -> Option<Route> {
    let served = resources::RESOURCES.iter().any(|r| r.group == group && r.version == version);
    if !served {
        return None;
    }
    if rest.is_empty() {
        return Some(Route::ResourceList { group: group.to_owned(), version: version.to_owned() });
    }
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, more @ ..] if resources::find(group, version, plural).is_some() => {
            (Some((*ns).to_owned()), [&[*plural][..], more].concat())
        }
        _ => (None, rest.to_vec()),
    };
    let res = resources::find(group, version, rest[0])?;
    let target = |name: Option<&&str>, sub: Option<&&str>| Target {
        res,
        namespace: namespace.clone(),
        name: name.map(|s| (*s).to_owned()),
        sub: sub.map(|s| (*s).to_owned()),
    };
    match rest.as_slice() {
        [_] => Some(Route::Object(target(None, None))),
        [_, name] => Some(Route::Object(target(Some(name), None))),
        [_, name, sub] if res.subresources.contains(sub) => Some(Route::Object(target(Some(name), Some(sub)))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(p: &str) -> (String, Option<String>, Option<String>, Option<String>) {
        match parse(p) {
            Some(Route::Object(t)) => (t.res.plural.to_owned(), t.namespace, t.name, t.sub),
            other => panic!("{p}: {other:?}"),
        }
    }

    #[test]
    fn resource_paths() {
        assert_eq!(target("/api/v1/pods"), ("pods".into(), None, None, None));
        assert_eq!(
            target("/api/v1/namespaces/default/pods/p/log"),
            ("pods".into(), Some("default".into()), Some("p".into()), Some("log".into()))
        );
        assert_eq!(target("/api/v1/namespaces/default"), ("namespaces".into(), None, Some("default".into()), None));
        assert_eq!(
            target("/api/v1/namespaces/x/status"),
            ("namespaces".into(), None, Some("x".into()), Some("status".into()))
        );
        assert_eq!(target("/apis/apps/v1/namespaces/d/deployments/h/scale").3, Some("scale".into()));
        assert_eq!(parse("/apis/apps/v1"), Some(Route::ResourceList { group: "apps".into(), version: "v1".into() }));
        assert_eq!(parse("/api/v1/widgets"), None);
        assert_eq!(parse("/api/v1/namespaces/d/pods/p/bogus"), None);
        assert_eq!(parse("/apis/batch/v1/jobs"), None);
        assert_eq!(parse("/api/v2/pods"), None);
    }
}
