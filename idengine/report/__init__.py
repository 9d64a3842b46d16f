"""Reports: Markdown summaries a step writes beside its outputs, PNG figures, and the HTML page of any run."""
