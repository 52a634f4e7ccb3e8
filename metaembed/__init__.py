"""The `metaembed` command line and Hub tooling: encode, score, publish, convert, card."""
