//! Why a backend cannot store now, shared by both: set by a failed write (or publish),
//! cleared by the next success or the backend's own probe, read by `/ready`. Each change
//! is logged once, as it happens.

use std::sync::Mutex;

pub struct Failing {
    why: Mutex<Option<String>>,
    /// Logged when it starts to fail, and when it works again.
    fails: &'static str,
    works: &'static str,
}

impl Failing {
    pub const fn new(fails: &'static str, works: &'static str) -> Failing {
        Failing {
            why: Mutex::new(None),
            fails,
            works,
        }
    }

    pub fn set(&self, why: Option<String>) {
        let mut failing = self.why.lock().expect("queue state poisoned");
        match (&*failing, &why) {
            (Some(_), None) => tracing::info!("{}", self.works),
            (None, Some(why)) => tracing::warn!(error = %why, "{}", self.fails),
            _ => {}
        }
        *failing = why;
    }

    /// Why it fails now, if it does.
    pub fn why(&self) -> Option<String> {
        self.why.lock().expect("queue state poisoned").clone()
    }

    pub fn is_failing(&self) -> bool {
        self.why.lock().expect("queue state poisoned").is_some()
    }
}
