//! Tests of the sans-IO client core.

mod scenarios;
