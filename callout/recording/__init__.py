"""Recordings: what `callout serve --record-dir` writes, and `callout replay`, which feeds it
through the decision core again.

- `writer`: the file format and the `Recorder` the service hands every decision to;
- `policy`: the non-secret part of a `Policy`, the first line of every file;
- `reader`: recordings and users files read back;
- `replay`: the recorded requests fed to the core (`Authorizer.start`, then `resume`, as the
  service does) and the decisions compared.
"""
