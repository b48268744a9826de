"""Python's http.client against the running gateway binary (driven by interop_http.rs).

Usage: interop_http.py HOST PORT. Prints "ok" and exits 0 when every check passes.
"""
import http.client
import json
import sys
import urllib.parse


def check(cond, what):
    if not cond:
        print("FAILED: " + what, file=sys.stderr)
        sys.exit(1)


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    conn = http.client.HTTPConnection(host, port, timeout=10)

    conn.request("GET", "/hello?name=py")
    r = conn.getresponse()
    body = r.read().decode()
    check(r.status == 200, "GET /hello status %d" % r.status)
    check(body == "hello py", "GET /hello body %r" % body)
    check(r.getheader("x-q") == "py", "x-q header %r" % r.getheader("x-q"))
    sock = conn.sock

    form = urllib.parse.urlencode({"a": "x y", "b": "1&2"})
    conn.request("POST", "/form", body=form,
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    body = r.read()
    check(r.status == 201, "POST /form status %d" % r.status)
    check(json.loads(body) == {"a": "x y", "b": "1&2"}, "POST /form body %r" % body)
    check(conn.sock is sock, "keep-alive: the connection was reused")

    conn.request("POST", "/form", body="a=1",
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    body = r.read()
    check(r.status == 400, "POST /form without b: status %d" % r.status)
    check(json.loads(body) == {"error": "missing b"}, "failure path body %r" % body)

    # Chunked request body.
    def chunks():
        yield b"a=chunk"
        yield b"ed&b=yes"
    conn.request("POST", "/form", body=chunks(), encode_chunked=True,
                 headers={"Content-Type": "application/x-www-form-urlencoded",
                          "Transfer-Encoding": "chunked"})
    r = conn.getresponse()
    body = r.read()
    check(r.status == 201, "chunked POST status %d" % r.status)
    check(json.loads(body) == {"a": "chunked", "b": "yes"}, "chunked body %r" % body)

    conn.request("GET", "/nowhere")
    r = conn.getresponse()
    body = r.read()
    check(r.status == 404, "404 status %d" % r.status)
    check(json.loads(body)["error"] == "not_found", "404 body %r" % body)
    check(r.getheader("Content-Type") == "application/json", "404 content type")

    conn.request("DELETE", "/hello")
    r = conn.getresponse()
    r.read()
    check(r.status == 405, "405 status %d" % r.status)
    check(r.getheader("Allow") == "GET", "Allow %r" % r.getheader("Allow"))
    check(conn.sock is sock, "keep-alive across error answers")
    conn.close()
    print("ok")


if __name__ == "__main__":
    main()
