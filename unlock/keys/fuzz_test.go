package keys

import (
	"bytes"
	"fmt"
	"io"
	"net/http/httputil"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/unlockrd/unlockrd/unlock/keyproto"
)

// marker stands for key bytes in the fuzzers' bodies: no error may ever
// contain it (no error quotes what a server sent).
const marker = "K3YM4T3R14L"

func responseSeeds() []string {
	k := marker + "\x00\x01"
	return []string{
		hdr200(octet, cl(k)) + k,
		hdr200(jsonCT, cl(`{"keys":[{"id":"a","key":"`+marker+`=="}]}`)) + `{"keys":[{"id":"a","key":"` + marker + `=="}]}`,
		hdr200(octet, "Transfer-Encoding: chunked") + fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(k), k),
		hdr200(octet, "Transfer-Encoding: chunked") + fmt.Sprintf("3;x=y\r\n%s\r\n%x\r\n%s\r\n0\r\nT: v\r\n\r\n", k[:3], len(k)-3, k[3:]),
		"HTTP/1.1 103 Early Hints\r\nLink: </>\r\n\r\n" + hdr200(octet, cl(k)) + k,
		"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 13\r\n\r\n" + marker + "xx",
		"HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n",
		"HTTP/1.0 200 OK\n" + octet + "\n" + cl(k) + "\n\n" + k,
		hdr200(octet, "Content-Length: 100") + k,
		hdr200(octet) + k,
		hdr200(octet, "Transfer-Encoding: chunked") + "ffff\r\n" + k,
	}
}

type readResult struct {
	status int
	body   string
	err    string
}

func readAll(r io.Reader) readResult {
	resp, err := readResponse(r)
	if err != nil {
		return readResult{err: err.Error()}
	}
	return readResult{status: resp.status, body: string(resp.body)}
}

// FuzzReadResponse: the reader never panics, never returns a body over
// keyproto.MaxBody, never quotes what it read in an error, and gives the
// same result whatever the reads' sizes (one byte at a time, or all at
// once), so TLS record boundaries cannot change what is accepted.
func FuzzReadResponse(f *testing.F) {
	for _, s := range responseSeeds() {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		whole := readAll(bytes.NewReader(data))
		bytewise := readAll(iotest.OneByteReader(bytes.NewReader(data)))
		halves := readAll(io.MultiReader(bytes.NewReader(data[:len(data)/2]), bytes.NewReader(data[len(data)/2:])))
		if whole != bytewise || whole != halves {
			t.Fatalf("read sizes change the result:\nwhole    %+v\nbytewise %+v\nhalves   %+v", whole, bytewise, halves)
		}
		if len(whole.body) > keyproto.MaxBody {
			t.Fatalf("body of %d bytes accepted", len(whole.body))
		}
		if strings.Contains(whole.err, marker) || strings.Contains(whole.err, marker[:6]) {
			t.Fatalf("error quotes the input: %s", whole.err)
		}
		if whole.err == "" && (whole.status < 200 || whole.status > 599) {
			t.Fatalf("status %d returned", whole.status)
		}
	})
}

// FuzzChunked compares our in-place chunked decoder with net/http's:
// whatever we accept, net/http decodes to the same bytes.
func FuzzChunked(f *testing.F) {
	f.Add([]byte("5\r\nhello\r\n0\r\n\r\n"))
	f.Add([]byte("3;ext=1\r\nabc\r\n2 \r\nde\r\n0\r\nTrailer: x\r\n\r\n"))
	f.Add([]byte("A\r\n0123456789\r\n0\r\n"))
	f.Add([]byte("1\r\nx\r\n1\r\ny\r\n1\r\nz\r\n0\r\n\r\n"))
	head := []byte(hdr200(octet, "Transfer-Encoding: chunked"))
	f.Fuzz(func(t *testing.T, body []byte) {
		resp, err := readResponse(iotest.HalfReader(bytes.NewReader(append(append([]byte(nil), head...), body...))))
		if err != nil {
			return
		}
		theirs, err := io.ReadAll(httputil.NewChunkedReader(bytes.NewReader(body)))
		if err != nil {
			t.Fatalf("we accepted %q, net/http refuses it: %v", body, err)
		}
		if !bytes.Equal(theirs, resp.body) {
			t.Fatalf("decoded %q, net/http %q", resp.body, theirs)
		}
	})
}

// FuzzParseRetryAfter: no panic, never a negative wait.
func FuzzParseRetryAfter(f *testing.F) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	f.Add("120", "")
	f.Add("Thu, 26 Nov 2026 12:01:00 GMT", "Thu, 26 Nov 2026 12:00:00 GMT")
	f.Add("Thursday, 26-Nov-26 12:01:00 GMT", "")
	f.Add("Thu Nov 26 12:01:00 2026", "garbage")
	f.Fuzz(func(t *testing.T, v, date string) {
		if d, ok := parseRetryAfter(v, date, now); ok && d < 0 {
			t.Fatalf("parseRetryAfter(%q, %q) = %s", v, date, d)
		}
	})
}

// FuzzCredential: any SMBIOS OEM-strings structure parses without a
// panic, a token taken from it is a clean bearer token, and no error
// quotes the credential's value (which starts with a marker here).
func FuzzCredential(f *testing.F) {
	f.Add([]byte{11, 5, 0, 0, 1}, uint8(0), "abc")
	f.Add([]byte{11, 5, 0, 0, 1}, uint8(1), "YWJj")
	f.Add([]byte{11, 5, 0, 0, 1}, uint8(1), "YWJ\x00")
	f.Add([]byte{11, 5, 0, 0, 1}, uint8(2), "io.systemd.credential:unlockrd.token=\r\n")
	const mark = "Zq9X"
	f.Fuzz(func(t *testing.T, head []byte, form uint8, v string) {
		var s string
		switch form % 3 {
		case 0:
			s = "io.systemd.credential:unlockrd.token=" + mark + v
		case 1:
			s = "io.systemd.credential.binary:unlockrd.token=" + mark + v
		default:
			s = v
		}
		raw := append(append(append([]byte(nil), head...), s...), 0, 0)
		tok, found, err := credentialIn(raw, CredToken)
		if found && err == nil {
			err = checkToken(tok)
		}
		if !found && (tok != nil || err != nil) {
			t.Fatalf("not found, yet %q, %v", tok, err)
		}
		all := ""
		if err != nil {
			all = err.Error()
		}
		if strings.Contains(all, mark) {
			t.Fatalf("notes or error quote the credential: %s", all)
		}
	})
}
