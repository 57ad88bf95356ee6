//! CIDR lists kept in files: blocklist feeds (the Spamhaus DROP format,
//! `1.10.16.0/20 ; SBL256894`), a CDN's published ranges for the allow list,
//! or the operator's own. One CIDR or address per line; `#` and `;` start a
//! comment; blank lines are skipped. A line that is not a network refuses the
//! whole file with `file:line`, so a truncated download changes nothing.
//! [`FileEntries`] is what the files said at the last load, and [`diff`]
//! what a reload must add and remove.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::units::Cidr;

/// A list file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ListFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid { path: PathBuf, line: usize, message: String },
}

/// The networks in `text` (the file at `path`, named in errors).
pub fn parse(path: &Path, text: &str) -> Result<Vec<Cidr>, ListFileError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split(['#', ';']).next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let c = line.parse::<Cidr>().map_err(|e: crate::units::UnitError| ListFileError::Invalid {
            path: path.to_owned(),
            line: i + 1,
            message: e.0,
        })?;
        out.push(c);
    }
    Ok(out)
}

/// Read and parse the file at `path`.
pub fn read(path: &Path) -> Result<Vec<Cidr>, ListFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ListFileError::Read { path: path.to_owned(), source })?;
    parse(path, &text)
}

/// Each network the files list, and the name of the first file listing it.
pub type FileEntries = BTreeMap<Cidr, String>;

/// Read every file in `paths` (all or nothing).
pub fn read_all(paths: &[PathBuf]) -> Result<FileEntries, ListFileError> {
    let mut out = FileEntries::new();
    for p in paths {
        let name = p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
        for c in read(p)? {
            out.entry(c).or_insert_with(|| name.clone());
        }
    }
    Ok(out)
}

/// What changed between two loads of the files.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<Cidr>,
    pub removed: Vec<Cidr>,
}

/// From `old` to `new`.
pub fn diff(old: &FileEntries, new: &FileEntries) -> Diff {
    Diff {
        added: new.keys().filter(|c| !old.contains_key(c)).copied().collect(),
        removed: old.keys().filter(|c| !new.contains_key(c)).copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn drop_format_comments_and_bare_addresses() {
        let text = "; Spamhaus DROP List 2026/11/27\n; Last-Modified: x\n1.10.16.0/20 ; SBL256894\n\n  2001:db8::/32 # v6\n192.0.2.7\n";
        let got = parse(Path::new("drop.txt"), text).unwrap();
        assert_eq!(got, vec![cidr("1.10.16.0/20"), cidr("2001:db8::/32"), cidr("192.0.2.7/32")]);
    }

    #[test]
    fn a_bad_line_refuses_the_file_at_its_line() {
        let e = parse(Path::new("feed.txt"), "10.0.0.0/8\n10.1.2.3/16 ; typo\n").unwrap_err().to_string();
        assert!(e.starts_with("feed.txt:2: ") && e.contains("did you mean 10.1.0.0/16"), "{e}");
        let e = read(Path::new("/nonexistent/feed.txt")).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/feed.txt: cannot read"), "{e}");
    }

    #[test]
    fn reload_applies_the_difference() {
        let old: FileEntries = [(cidr("10.0.0.0/8"), "a".into()), (cidr("192.0.2.0/24"), "a".into())].into();
        let new: FileEntries = [(cidr("10.0.0.0/8"), "a".into()), (cidr("198.51.100.0/24"), "b".into())].into();
        assert_eq!(
            diff(&old, &new),
            Diff { added: vec![cidr("198.51.100.0/24")], removed: vec![cidr("192.0.2.0/24")] }
        );
        assert_eq!(diff(&new, &new), Diff::default());
    }
}
