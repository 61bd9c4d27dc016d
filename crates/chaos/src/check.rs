//! How the harness checks a service, from the `[check]` table of its config file (which the
//! supervisor keeps without reading):
//!
//! ```toml
//! [check]
//! path = "/predict"                 # default "/infer"
//! body = '{"seed": SEED}'           # default; SEED becomes the request's seed (0..64)
//! answer = "y"                      # the answer's JSON field to compare (a number or an array)
//! reference = ["mlp-worker", "reference", "--seeds", "0..64", "{weights}"]
//! # or reference = "agree": every worker gives the same answer per seed and generation
//! # or reference = "linear": the linear demo's own reference (the default without [check])
//! ```
//!
//! A reference command runs once, with `{weights}` replaced by the config's `[model] path`,
//! and prints `{"SEED": answer, ...}` as JSON; its program is found like `[workers] command`.
//! Every answer must have `generation` and `worker` fields besides `answer`.
//!
//! ```
//! let table: toml::Table = toml::from_str("path = \"/predict\"\nanswer = \"y\"\nreference = \"agree\"").unwrap();
//! let check = forkless_chaos::check::CheckSpec::from_table(Some(&table)).unwrap();
//! assert_eq!(check.body(7), "{\"seed\": 7}");
//! ```

use serde::Deserialize;

/// What `[check]` says; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckSpec {
    pub path: String,
    pub body: String,
    pub answer: Option<String>,
    pub reference: ReferenceSpec,
}

/// Where the expected answers come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ReferenceSpec {
    /// `"linear"` (the demo's reference, computed here) or `"agree"`.
    Named(String),
    /// A command printing the expected answers.
    Command(Vec<String>),
}

impl Default for CheckSpec {
    fn default() -> Self {
        CheckSpec {
            path: "/infer".into(),
            body: "{\"seed\": SEED}".into(),
            answer: None,
            reference: ReferenceSpec::Named("linear".into()),
        }
    }
}

/// `[check]` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("[check]: {0}")]
    Parse(String),
    #[error("[check] reference = {0:?}: use \"linear\", \"agree\", or a command (an array)")]
    UnknownReference(String),
    #[error("[check] answer: name the JSON field to compare (e.g. answer = \"y\"); only the linear reference knows its fields")]
    NoAnswerField,
    #[error("[check] body {0:?} has no SEED placeholder: the harness needs to vary the request")]
    NoSeed(String),
}

impl CheckSpec {
    /// Reads `[check]`; `None` (no table) is the linear demo's check.
    pub fn from_table(table: Option<&toml::Table>) -> Result<CheckSpec, CheckError> {
        let Some(table) = table else { return Ok(CheckSpec::default()) };
        let spec: CheckSpec = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| CheckError::Parse(e.to_string()))?;
        if !spec.body.contains("SEED") {
            return Err(CheckError::NoSeed(spec.body));
        }
        match &spec.reference {
            ReferenceSpec::Named(name) if name == "linear" => {}
            ReferenceSpec::Named(name) if name != "agree" => return Err(CheckError::UnknownReference(name.clone())),
            _ if spec.answer.is_none() => return Err(CheckError::NoAnswerField),
            _ => {}
        }
        Ok(spec)
    }

    /// The request body for `seed`.
    pub fn body(&self, seed: u64) -> String {
        self.body.replace("SEED", &seed.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CheckSpec, CheckError> {
        CheckSpec::from_table(Some(&toml::from_str(text).unwrap()))
    }

    #[test]
    fn defaults_are_the_linear_demo() {
        let spec = CheckSpec::from_table(None).unwrap();
        assert_eq!((spec.path.as_str(), spec.body(3).as_str()), ("/infer", "{\"seed\": 3}"));
        assert_eq!(spec.reference, ReferenceSpec::Named("linear".into()));
    }

    #[test]
    fn commands_and_agreement_need_an_answer_field() {
        let spec = parse("answer = \"y\"\nreference = [\"mlp-worker\", \"reference\", \"{weights}\"]").unwrap();
        assert_eq!(
            spec.reference,
            ReferenceSpec::Command(vec!["mlp-worker".into(), "reference".into(), "{weights}".into()])
        );
        assert!(matches!(parse("reference = \"agree\""), Err(CheckError::NoAnswerField)));
        assert!(matches!(parse("reference = \"oracle\""), Err(CheckError::UnknownReference(_))));
        assert!(matches!(parse("body = \"{}\""), Err(CheckError::NoSeed(_))));
        assert!(parse("colour = 1").unwrap_err().to_string().contains("colour"));
    }
}
