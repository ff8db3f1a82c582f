"""Transport and its rules: URIs to files and filesystems (storage), http(s) pinned to public
addresses (pinned_http), which URIs are allowed (urls), and messages to child processes (child_process)."""
