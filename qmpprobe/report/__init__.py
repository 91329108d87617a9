"""Reports (CSV, HTML, Markdown) of analyses; escaping for each format."""
