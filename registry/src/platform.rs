//! Platforms (`os/arch[/variant]`) and choosing a manifest from an index.

use std::fmt;
use std::str::FromStr;

use crate::RegistryError;

/// A platform an image is built for, as in `--platform linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture in Go's spelling, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// CPU variant, e.g. `v7` for `arm`, if any.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this host: `linux` and the host architecture in Go's
    /// spelling (`amd64` on x86_64, `arm64` on aarch64, ...).
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "powerpc64" => "ppc64",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            os: "linux".to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }

    /// Whether a manifest for `os`/`architecture`/`variant` suits this
    /// platform. A platform without variant accepts any variant; `arm64`
    /// without variant and `arm64/v8` are the same thing.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        if self.os != os || self.architecture != architecture {
            return false;
        }
        match &self.variant {
            None => true,
            Some(wanted) => {
                normal_variant(architecture, Some(wanted)) == normal_variant(architecture, variant)
            }
        }
    }
}

/// `arm64` is `arm64/v8` unless said otherwise.
fn normal_variant<'a>(architecture: &str, variant: Option<&'a str>) -> Option<&'a str> {
    match (architecture, variant) {
        ("arm64", None) => Some("v8"),
        (_, v) => v,
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = RegistryError;

    /// Parses `os/arch[/variant]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok_part = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok_part) {
            return Err(RegistryError::InvalidPlatform(s.to_owned()));
        }
        Ok(Platform {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() -> Result<(), RegistryError> {
        let p: Platform = "linux/arm64/v8".parse()?;
        assert_eq!(p.os, "linux");
        assert_eq!(p.architecture, "arm64");
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            "linux/amd64".parse::<Platform>()?.to_string(),
            "linux/amd64"
        );
        for bad in [
            "linux",
            "",
            "linux/",
            "a/b/c/d",
            "linux//v7",
            "lin ux/amd64",
        ] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn matching() -> Result<(), RegistryError> {
        let arm64: Platform = "linux/arm64".parse()?;
        assert!(arm64.matches("linux", "arm64", Some("v8")));
        assert!(arm64.matches("linux", "arm64", None));
        assert!(!arm64.matches("linux", "amd64", None));
        let v8: Platform = "linux/arm64/v8".parse()?;
        assert!(v8.matches("linux", "arm64", None));
        let v7: Platform = "linux/arm/v7".parse()?;
        assert!(!v7.matches("linux", "arm", Some("v6")));
        assert!(!v7.matches("linux", "arm", None));
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        Ok(())
    }
}
