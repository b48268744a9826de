"""Interop: authlib (an OAuth client nobody here wrote) against the gateway's token endpoint.

Usage: authlib_refresh.py TOKEN_URL CLIENT_ID CLIENT_SECRET AUTH_METHOD
AUTH_METHOD is client_secret_basic or client_secret_post. Fetches a token with the client
credentials grant, refreshes it, and checks what a client relies on. Exits non-zero on any
mismatch; prints one JSON line of what it saw (no token values).
"""
import json
import sys

from authlib.integrations.requests_client import OAuth2Session


def main() -> int:
    url, client_id, secret, method = sys.argv[1:5]
    s = OAuth2Session(client_id, secret, token_endpoint_auth_method=method, scope="read")
    first = s.fetch_token(url, grant_type="client_credentials")
    assert first["token_type"] == "Bearer", first.keys()
    assert isinstance(first["expires_in"], int) and first["expires_in"] == 3600
    assert "refresh_token" in first, "include_refresh_token is on in the default policies"
    refreshed = s.refresh_token(url, refresh_token=first["refresh_token"])
    assert refreshed["access_token"] != first["access_token"]
    assert refreshed["refresh_token"] != first["refresh_token"]
    assert refreshed["token_type"] == "Bearer"
    assert refreshed["scope"] == "read"
    # The old refresh token is gone: authlib raises the server's OAuth error.
    try:
        s.refresh_token(url, refresh_token=first["refresh_token"])
    except Exception as e:  # authlib's OAuthError
        error = getattr(e, "error", str(e))
    else:
        print("reused refresh token was accepted", file=sys.stderr)
        return 1
    print(json.dumps({
        "method": method,
        "access_len": len(refreshed["access_token"]),
        "refresh_len": len(refreshed["refresh_token"]),
        "reuse_error": error,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
