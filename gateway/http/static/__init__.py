"""Package data only: the status page's CSS and JavaScript (a package, so that wheels include the files)."""
