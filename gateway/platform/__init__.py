"""The city platform's receiver: consumes the platform contract (docs/platform-contract.md), see README.md here."""
