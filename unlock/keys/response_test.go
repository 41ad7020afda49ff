package keys

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/pin"
)

// hdr200 starts a 200 answer with the given extra headers.
func hdr200(h ...string) string {
	return "HTTP/1.1 200 OK\r\n" + strings.Join(h, "\r\n") + "\r\n\r\n"
}

func cl(b string) string { return fmt.Sprintf("Content-Length: %d", len(b)) }

const octet = "Content-Type: application/octet-stream"
const jsonCT = "Content-Type: application/json"

// TestMalformedResponsesRefusedWithoutLeaking sends, from a real pinned
// TLS server, every malformed answer the reader has a separate path for
// (the paths the fuzzers explore), each carrying the key in its body, and
// checks that each is refused with its own cause and that neither the key
// nor the token appears in any line logged or in the error (fetch runs
// checkNoSecret).
func TestMalformedResponsesRefusedWithoutLeaking(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	k := string(testKey)
	b64 := base64.StdEncoding.EncodeToString(testKey)
	chunk := fmt.Sprintf("%x\r\n%s\r\n", len(k), k)
	jsonBody := func(s string) string { return hdr200(jsonCT, cl(s)) + s }
	for _, tc := range []struct{ name, resp, want string }{
		{"content-length cut short", hdr200(octet, "Content-Length: 100") + k, fmt.Sprintf("body cut short: %d of 100 bytes", len(k))},
		{"content-length over the limit", hdr200(octet, "Content-Length: 65537") + k, "exceeds 65536 bytes"},
		{"chunked without last chunk", hdr200(octet, "Transfer-Encoding: chunked") + chunk, "no last chunk"},
		{"chunk size not hex", hdr200(octet, "Transfer-Encoding: chunked") + "zz\r\n" + k + "\r\n0\r\n\r\n", "malformed chunk size"},
		{"chunk size with a sign", hdr200(octet, "Transfer-Encoding: chunked") + "+2d\r\n" + k + "\r\n0\r\n\r\n", "malformed chunk size"},
		{"chunk data without CRLF", hdr200(octet, "Transfer-Encoding: chunked") + fmt.Sprintf("%x\r\n%sXX0\r\n\r\n", len(k), k), "not followed by CRLF"},
		{"chunk-size line with a bare LF", hdr200(octet, "Transfer-Encoding: chunked") + fmt.Sprintf("%x\n%s\r\n0\r\n\r\n", len(k), k), "no CRLF"},
		{"chunk over the limit", hdr200(octet, "Transfer-Encoding: chunked") + "10001\r\n" + k, "exceeds 65536 bytes"},
		{"chunks adding up over the limit", hdr200(octet, "Transfer-Encoding: chunked") + strings.Repeat(fmt.Sprintf("%x\r\n%s\r\n", 8000, strings.Repeat(k, 8000/len(k)+1)[:8000]), 9) + "0\r\n\r\n", "exceeds 65536 bytes"},
		{"chunk-size line too long", hdr200(octet, "Transfer-Encoding: chunked") + "2d;" + strings.Repeat("x", 5000) + "\r\n" + k, "chunk-size line exceeds"},
		{"no framing", hdr200(octet) + k, "without Content-Length or chunked framing"},
		{"conflicting content-length", hdr200(octet, cl(k), cl(k+"x")) + k, "conflicting Content-Length"},
		{"negative content-length", hdr200(octet, "Content-Length: -45") + k, "malformed Content-Length"},
		{"content-length with a sign", hdr200(octet, "Content-Length: +45") + k, "malformed Content-Length"},
		{"gzip", hdr200(octet, "Transfer-Encoding: gzip, chunked") + chunk + "0\r\n\r\n", "unsupported transfer encoding"},
		{"obsolete line folding", hdr200(octet, cl(k), " ; folded") + k, "obsolete line folding"},
		{"header without colon", hdr200(octet, cl(k), "Broken header") + k, "malformed header line"},
		{"header name with a space", hdr200(octet, cl(k), "Bad Name: x") + k, "malformed header line"},
		{"the key instead of HTTP", k + "\r\n\r\n", "not an HTTP/1.x response"},
		{"HTTP/2 status line", "HTTP/2 200\r\n" + octet + "\r\n" + cl(k) + "\r\n\r\n" + k, "not an HTTP/1.x response"},
		{"status code not a number", "HTTP/1.1 2x0 OK\r\n" + cl(k) + "\r\n\r\n" + k, "malformed status code"},
		{"status code out of range", "HTTP/1.1 700 OK\r\n" + cl(k) + "\r\n\r\n" + k, "malformed status code"},
		{"closed without an answer", "", "connection closed without an answer"},
		{"closed inside the headers", "HTTP/1.1 200 OK\r\n" + octet, "connection closed inside the response headers"},
		{"101", "HTTP/1.1 101 Switching Protocols\r\n\r\n" + k, "unexpected 101"},
		{"endless interim answers", strings.Repeat("HTTP/1.1 100 Continue\r\n\r\n", 10) + hdr200(octet, cl(k)) + k, "interim (1xx) answers"},
		{"headers too large", hdr200(octet, "X-Pad: "+strings.Repeat("a", 20000)) + k, "headers exceed 16384 bytes"},
		{"truncated JSON", jsonBody(`{"keys":[{"id":"a","key":"` + b64 + `"}`), "invalid JSON key list"},
		{"JSON key not base64", jsonBody(`{"keys":[{"id":"a","key":"` + b64 + `!"}]}`), `keys[0] (id "a"): not a non-empty base64 string`},
		{"JSON second key bad", jsonBody(`{"keys":[{"id":"a","key":"` + b64 + `"},{"id":"b","key":"%` + b64 + `"}]}`), "keys[1]"},
		{"JSON key with a control escape", jsonBody(`{"keys":[{"id":"a","key":"` + b64 + `\n"}]}`), "keys[0]"},
		{"JSON key not a string", jsonBody(`{"keys":[{"id":"a","key":[1,2]}]}`), "keys[0]"},
		{"JSON empty key", jsonBody(`{"keys":[{"id":"a","key":""}]}`), "keys[0]"},
		{"JSON empty key list", jsonBody(`{"keys":[]}`), "empty key list"},
		{"JSON not an object", jsonBody(`["` + b64 + `"]`), "invalid JSON key list"},
		{"wrong content type", hdr200("Content-Type: text/html", cl(k)) + k, `unsupported content type "text/html"`},
		{"no content type", hdr200(cl(k)) + k, `unsupported content type ""`},
		{"empty raw body", hdr200(octet, "Content-Length: 0"), "empty application/octet-stream body"},
		{"redirect without Location", "HTTP/1.1 302 Found\r\n" + cl(k) + "\r\n\r\n" + k, "302 redirect without a Location"},
		{"redirect to plain HTTP", "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1/x\r\n\r\n", "redirect to a http: URL refused"},
		{"redirect to another port", "HTTP/1.1 308 Permanent Redirect\r\nLocation: https://127.0.0.1:1/x\r\n\r\n", "redirect to another host (127.0.0.1:1) refused"},
		{"malformed Location", "HTTP/1.1 301 Moved\r\nLocation: https://[::1\r\n\r\n", "malformed Location"},
		{"300 is not followed", "HTTP/1.1 300 Multiple Choices\r\nLocation: /x\r\n\r\n", "HTTP status 300"},
		{"500 with the key in its body", "HTTP/1.1 500 Oops\r\n" + cl(k) + "\r\n\r\n" + k, "HTTP status 500"},
		{"429 with a key as Retry-After", "HTTP/1.1 429 Slow Down\r\nRetry-After: " + b64 + "\r\n\r\n", "429 too many requests"},
		{"404", "HTTP/1.1 404 Not Found\r\n\r\n", "404 unknown host (not enrolled?)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startProbe(t, leaf, 0, []byte(tc.resp))
			_, err, log, _ := fetch(t, []string{"https://" + p.addr + "/v1/keys/{host}"}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
			if !errors.Is(err, errStop) {
				t.Fatalf("err = %v, want a refusal and a retry", err)
			}
			if !strings.Contains(log.String(), tc.want) {
				t.Fatalf("log %q does not say %q", log, tc.want)
			}
		})
	}
}

// TestResponseFormsAccepted: the forms a real server may legitimately use.
func TestResponseFormsAccepted(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	k := string(testKey)
	slashKey := []byte{0xff, 0xff, 0xff, 0xfb, 0xef, 0xbe, 1, 2, 3} // base64 "////++++AQID"
	esc := strings.ReplaceAll(base64.StdEncoding.EncodeToString(slashKey), "/", `\/`)
	esc = `\u002F` + esc[2:] // and a \u escape for good measure
	if !strings.HasPrefix(base64.StdEncoding.EncodeToString(slashKey), "/") {
		t.Fatal("test key does not start with a slash")
	}
	unpadded := strings.TrimRight(base64.StdEncoding.EncodeToString(testKey), "=")
	for _, tc := range []struct {
		name, resp string
		want       [][]byte
	}{
		{"103 Early Hints first", "HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n" + hdr200(octet, cl(k)) + k, [][]byte{testKey}},
		{"small chunks with extensions", hdr200(octet, "Transfer-Encoding: chunked") +
			fmt.Sprintf("3;a=b\r\n%s\r\n%X \r\n%s\r\n0\r\nTrailer: x\r\n\r\n", k[:3], len(k)-3, k[3:]), [][]byte{testKey}},
		{"Transfer-Encoding over Content-Length", hdr200(octet, "Content-Length: 3", "Transfer-Encoding: Chunked") + fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(k), k), [][]byte{testKey}},
		{"bare LF header lines", "HTTP/1.1 200 OK\n" + octet + "\n" + cl(k) + "\n\n" + k, [][]byte{testKey}},
		{"HTTP/1.0", "HTTP/1.0 200 OK\r\n" + octet + "\r\n" + cl(k) + "\r\n\r\n" + k, [][]byte{testKey}},
		{"content type with parameters", hdr200("content-type: Application/JSON; charset=utf-8", cl(`{"keys":[{"id":"x","key":"`+esc+`"}]}`)) + `{"keys":[{"id":"x","key":"` + esc + `"}]}`, [][]byte{slashKey}},
		{"unpadded base64, unknown fields", hdr200(jsonCT, cl(`{"v":2,"keys":[{"id":"x","key":"`+unpadded+`","not_after":"2027"}]}`)) + `{"v":2,"keys":[{"id":"x","key":"` + unpadded + `","not_after":"2027"}]}`, [][]byte{testKey}},
		{"bytes after the body ignored", hdr200(octet, cl(k)) + k + "garbage", [][]byte{testKey}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startProbe(t, leaf, 0, []byte(tc.resp))
			got, err, log, _ := fetch(t, []string{"https://" + p.addr + "/v1/keys/{host}"}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
			if err != nil {
				t.Fatalf("refused: %v\n%s", err, log)
			}
			if len(got.Keys) != len(tc.want) {
				t.Fatalf("%d keys, want %d", len(got.Keys), len(tc.want))
			}
			for i := range tc.want {
				if !bytes.Equal(got.Keys[i].Bytes(), tc.want[i]) {
					t.Fatalf("key %d differs", i)
				}
			}
			got.Wipe()
		})
	}
}

func TestRedirectLoops(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	for _, tc := range []struct {
		name string
		h    http.HandlerFunc
		want string
	}{
		{"to itself", func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, r.URL.Path, http.StatusFound)
		}, "redirect loop (/v1/keys/host-1)"},
		{"between two paths", func(w http.ResponseWriter, r *http.Request) {
			next := "/a"
			if r.URL.Path == "/a" {
				next = "/v1/keys/host-1"
			}
			http.Redirect(w, r, next, http.StatusTemporaryRedirect)
		}, "redirect loop"},
		{"ever onwards", func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, r.URL.Path+"x", http.StatusSeeOther)
		}, "more than 5 redirects"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, []*certKit{leaf}, tc.h)
			_, err, log, _ := fetch(t, []string{urlOf(s)}, []pin.Pin{pin.FromCert(leaf.cert)}, 1, nil)
			if !errors.Is(err, errStop) || !strings.Contains(log.String(), tc.want) {
				t.Fatalf("err=%v log=%s", err, log)
			}
			if n := s.requests.Load(); n > maxRedirects+1 {
				t.Fatalf("%d requests in one attempt", n)
			}
		})
	}
}
