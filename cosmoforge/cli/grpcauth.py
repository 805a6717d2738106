"""The options every gRPC server and client command shares: where to listen, the token, TLS.

Written once as parent parsers so that `cosmo dispatcher`, `cosmo decontaminator` and the
client commands spell them the same way, and the rule "no token, no listening beyond
loopback" is checked in one place.
"""

from __future__ import annotations

import argparse
from typing import Any


def server_options(port: int) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--port", type=int, default=port, help=f"gRPC port (default: {port}; 0: any free)")
    parent.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface needs a token)",
    )
    parent.add_argument(
        "--token-file",
        metavar="FILE",
        help="require `authorization: Bearer <token>` on every call, the token read from FILE "
        "(default: $COSMOFORGE_TOKEN, if set)",
    )
    parent.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate (chain)")
    parent.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    parent.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen beyond loopback without a token (anyone who reaches the port may call it)",
    )
    return parent


def client_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--token-file", metavar="FILE", help="bearer token for the service (default: $COSMOFORGE_TOKEN)"
    )
    parent.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's roots")
    parent.add_argument("--tls-ca", metavar="FILE", help="connect over TLS, trusting this PEM CA certificate")
    return parent


def server_security(args: argparse.Namespace) -> Any:
    """The ServerSecurity the flags ask for; raises CredentialsError for a refused combination."""
    from cosmoforge.services import grpcbase

    token = grpcbase.read_token(args.token_file)
    if token is None and not args.allow_unauthenticated and not grpcbase.is_loopback(args.host):
        raise grpcbase.CredentialsError(
            f"refusing to listen on {args.host} without a token: pass --token-file (or set "
            f"{grpcbase.TOKEN_ENV}), or --allow-unauthenticated"
        )
    return grpcbase.ServerSecurity(token=token, cert_file=args.tls_cert, key_file=args.tls_key)


def client_security(args: argparse.Namespace) -> Any:
    from cosmoforge.services import grpcbase

    return grpcbase.ClientSecurity.load(args.token_file, ca_file=args.tls_ca, tls=args.tls)
