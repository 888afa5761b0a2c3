"""HTTP Signature authentication of CloudAPI requests, and the SSH keys it checks against."""
