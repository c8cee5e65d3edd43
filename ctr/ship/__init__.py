"""Shipping a version: the immutable Bento (`bento`), its OCI image (`image`), smoke tests of
the image alone and wired as in deploy/k8s (`smoke`); `common` holds paths and names.

May import: everything below it (`ctr.settings`, the local-server helpers of `ctr.bench`);
nothing on the serving path imports this package.
"""
