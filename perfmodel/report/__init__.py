"""The HTML roofline report: figures (PNG, embedded and saved beside), per-operator table, and the plan."""
