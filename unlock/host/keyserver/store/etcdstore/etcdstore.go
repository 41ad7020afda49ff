// Package etcdstore keeps host records in etcd, so that several stateless
// key servers (replicas) serve one fleet and an admin command run against
// any of them, or against etcd directly, is seen by all at the next request.
//
// Layout under the prefix (default /unlockrd/):
//
//	<prefix>meta/schema         "unlockrd-hosts/1": marks the prefix as ours
//	<prefix>meta/master-key-id  id of the master key the keys are sealed under
//	<prefix>hosts/<id>          one host record, JSON (as in the bbolt store)
//
// Every change is a transaction that compares a revision: Create writes
// only if the key has never been created, Update writes only if the record
// is still at the mod revision it was read at, and otherwise reads the
// winner's record and applies its function again. Reads are linearizable,
// so a host added through one replica is served by every other one at once.
//
// Failures of the cluster that leave it usable (a member gone, a leader
// election, an overloaded member) are retried, with backoff, until the
// operation's deadline; the client moves to the members still up. A write
// whose outcome is unknown (the connection broke after it was sent) is
// settled by reading the record back: if it holds exactly what we wrote,
// the write landed. Past the deadline the store answers store.ErrBusy,
// which the server turns into 503 + Retry-After.
package etcdstore

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// Schema marks a prefix as holding unlockrd host records (the same
// version string as the bbolt store's: the records are the same JSON).
const Schema = "unlockrd-hosts/1"

// DefaultPrefix is where the records live unless Options.Prefix says otherwise.
const DefaultPrefix = "/unlockrd/"

// DefaultTimeout bounds one operation, retries included, when the caller's
// context has no sooner deadline.
const DefaultTimeout = 5 * time.Second

// listPage is how many records one List request fetches; pages keep each
// response far below etcd's and gRPC's message limits for large fleets.
const listPage = 500

// Options tune Open.
type Options struct {
	// Endpoints are the client URLs of the etcd members
	// (http://host:2379, or https:// with TLS).
	Endpoints []string
	// Prefix is prepended to every key; "" means DefaultPrefix. Several
	// independent key services may share a cluster under different prefixes.
	Prefix string
	// TLS is used for https:// endpoints (client certificates, CA).
	TLS *tls.Config
	// Username and Password for etcd's authentication, if enabled.
	Username, Password string
	// Create marks an empty prefix as ours. Without it, Open fails on a
	// prefix holding no unlockrd data (a typo must not look like an empty fleet).
	Create bool
	// Timeout bounds each operation (retries included) when the context
	// has no sooner deadline; 0 means DefaultTimeout.
	Timeout time.Duration
}

// Store is a store.Store over an etcd cluster. It is safe for concurrent
// use by many goroutines and by many processes on many machines.
type Store struct {
	cli     *clientv3.Client
	prefix  string
	timeout time.Duration
	where   string
}

var _ store.Store = (*Store)(nil)

// Open connects to the cluster and checks that the prefix holds our data
// (or, with Create, marks an empty prefix as ours).
func Open(ctx context.Context, o Options) (*Store, error) {
	if len(o.Endpoints) == 0 {
		return nil, errors.New("etcd: no endpoints given")
	}
	prefix := o.Prefix
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	where := fmt.Sprintf("etcd %s prefix %s", strings.Join(o.Endpoints, ","), prefix)
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   o.Endpoints,
		DialTimeout: timeout,
		// Notice a member that vanished without closing its connections
		// (a crashed machine) and move to another.
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		TLS:                  o.TLS,
		Username:             o.Username,
		Password:             o.Password,
		// Failures come back to us as errors naming the store; the
		// client's own chatter would only repeat them on stderr.
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	s := &Store{cli: cli, prefix: prefix, timeout: timeout, where: where}
	if err := s.checkSchema(ctx, o.Create); err != nil {
		cli.Close()
		return nil, err
	}
	return s, nil
}

// String names the store in messages: endpoints and prefix.
func (s *Store) String() string { return s.where }

// Client returns the etcd client (for tests and tools).
func (s *Store) Client() *clientv3.Client { return s.cli }

func (s *Store) schemaKey() string        { return s.prefix + "meta/schema" }
func (s *Store) masterKey() string        { return s.prefix + "meta/master-key-id" }
func (s *Store) hostsPrefix() string      { return s.prefix + "hosts/" }
func (s *Store) hostKey(id string) string { return s.hostsPrefix() + id }

func (s *Store) checkSchema(ctx context.Context, create bool) error {
	return s.do(ctx, "open", func(ctx context.Context) error {
		resp, err := s.cli.Get(ctx, s.schemaKey())
		if err != nil {
			return err
		}
		if len(resp.Kvs) > 0 {
			if v := string(resp.Kvs[0].Value); v != Schema {
				return fmt.Errorf("%s: schema marker says %q, want %q: %w", s.where, v, Schema, store.ErrCorrupt)
			}
			return nil
		}
		if !create {
			return fmt.Errorf("%s holds no unlockrd host data (check --etcd-prefix; `serve` or `host add` creates it): %w",
				s.where, os.ErrNotExist)
		}
		// Refuse to adopt keys we did not write: a wrong prefix pointing
		// into another application's data must not be mixed with hosts.
		cnt, err := s.cli.Get(ctx, s.prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return err
		}
		if cnt.Count > 0 {
			return fmt.Errorf("%s holds %d keys but no unlockrd schema marker: not our data: %w", s.where, cnt.Count, store.ErrCorrupt)
		}
		tr, err := s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(s.schemaKey()), "=", 0)).
			Then(clientv3.OpPut(s.schemaKey(), Schema)).
			Commit()
		if err != nil {
			return err
		}
		if !tr.Succeeded {
			// Another process marked it first: check what it wrote.
			return errAgain
		}
		return nil
	})
}

// errAgain asks do to run the operation again (a lost race), with backoff.
var errAgain = errors.New("retry")

// transient reports failures worth retrying: the cluster (or the member
// we talk to) is briefly unable to answer, but the request was valid.
func transient(err error) bool {
	if errors.Is(err, errAgain) {
		return true
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		// Our own context: the caller's time is up, not etcd's fault.
		return false
	}
	code := status.Code(err)
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		code = ee.Code()
	}
	switch code {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted:
		return true
	}
	return false
}

func isContextErr(err error) bool {
	c := status.Code(err)
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		c == codes.Canceled || c == codes.DeadlineExceeded
}

// do runs op until it succeeds or fails for good, retrying transient
// failures with capped, jittered backoff until the operation's deadline.
func (s *Store) do(ctx context.Context, what string, op func(ctx context.Context) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %s: %w", s.where, what, err)
	}
	if dl, ok := ctx.Deadline(); !ok || time.Until(dl) > s.timeout {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.timeout)
		defer cancel()
	}
	backoff := 10 * time.Millisecond
	for {
		err := op(ctx)
		if err == nil {
			return nil
		}
		timeUp := ctx.Err() != nil
		if !transient(err) && !(timeUp && isContextErr(err)) {
			return err // an answer (not found, exists, corrupt, fn's error)
		}
		if timeUp {
			if errors.Is(err, errAgain) {
				err = ctx.Err()
			}
			return fmt.Errorf("%s: %s: %w: %w", s.where, what, store.ErrBusy, err)
		}
		t := time.NewTimer(rand.N(backoff) + time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

func (s *Store) decode(id string, kv *mvccpb.KeyValue) (store.Host, error) {
	var h store.Host
	if err := json.Unmarshal(kv.Value, &h); err != nil {
		return h, fmt.Errorf("%s: record %q: %v: %w", s.where, kv.Key, err, store.ErrCorrupt)
	}
	if h.ID != id {
		return h, fmt.Errorf("%s: record %q holds host %q: %w", s.where, kv.Key, h.ID, store.ErrCorrupt)
	}
	return h, nil
}

func notFound(id string) error { return fmt.Errorf("host %q: %w", id, store.ErrNotFound) }

// Get implements store.Store.
func (s *Store) Get(ctx context.Context, id string) (store.Host, error) {
	var h store.Host
	err := s.do(ctx, "get host "+id, func(ctx context.Context) error {
		resp, err := s.cli.Get(ctx, s.hostKey(id))
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 0 {
			return notFound(id)
		}
		h, err = s.decode(id, resp.Kvs[0])
		return err
	})
	return h, err
}

// List implements store.Store: all records as of one revision, in pages,
// ordered by id (etcd returns keys in byte order).
func (s *Store) List(ctx context.Context) ([]store.Host, error) {
	var out []store.Host
	end := clientv3.GetPrefixRangeEnd(s.hostsPrefix())
	err := s.do(ctx, "list hosts", func(ctx context.Context) error {
		out = out[:0]
		var rev int64
		from := s.hostsPrefix()
		for {
			opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(listPage)}
			if rev != 0 {
				opts = append(opts, clientv3.WithRev(rev))
			}
			resp, err := s.cli.Get(ctx, from, opts...)
			if errors.Is(err, rpctypes.ErrCompacted) {
				return errAgain // the revision we paged at is gone: start over
			}
			if err != nil {
				return err
			}
			if rev == 0 {
				rev = resp.Header.Revision
			}
			for _, kv := range resp.Kvs {
				h, err := s.decode(strings.TrimPrefix(string(kv.Key), s.hostsPrefix()), kv)
				if err != nil {
					return err
				}
				out = append(out, h)
			}
			if !resp.More || len(resp.Kvs) == 0 {
				return nil
			}
			from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
		}
	})
	return out, err
}

// Create implements store.Store.
func (s *Store) Create(ctx context.Context, h store.Host) error {
	h, val, err := store.EncodeNew(h)
	if err != nil {
		return err
	}
	key := s.hostKey(h.ID)
	unsure := false
	return s.do(ctx, "create host "+h.ID, func(ctx context.Context) error {
		if unsure {
			// The last attempt may have landed. If it did, it created the
			// record, so the value at the record's create revision is ours
			// (a fresh sealed key and token hash make it unique).
			resp, err := s.cli.Get(ctx, key)
			if err != nil {
				return err
			}
			if len(resp.Kvs) > 0 {
				first, err := s.cli.Get(ctx, key, clientv3.WithRev(resp.Kvs[0].CreateRevision))
				if err != nil && !errors.Is(err, rpctypes.ErrCompacted) {
					return err
				}
				v := resp.Kvs[0].Value
				if err == nil && len(first.Kvs) > 0 {
					v = first.Kvs[0].Value
				}
				if bytes.Equal(v, val) {
					return nil
				}
				return fmt.Errorf("host %q: %w", h.ID, store.ErrExists)
			}
			unsure = false
		}
		tr, err := s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, string(val))).
			Commit()
		if err != nil {
			unsure = true
			return err
		}
		if !tr.Succeeded {
			return fmt.Errorf("host %q: %w", h.ID, store.ErrExists)
		}
		return nil
	})
}

// Update implements store.Store: read, apply fn, write if the record is
// still at the revision read; on a lost race apply fn to the winner's
// record. fn may run several times.
func (s *Store) Update(ctx context.Context, id string, fn func(h *store.Host) error) (store.Host, error) {
	key := s.hostKey(id)
	var (
		out     store.Host
		kv      *mvccpb.KeyValue // last record seen
		pending []byte           // sent against kv, outcome unknown
		pendH   store.Host
	)
	err := s.do(ctx, "update host "+id, func(ctx context.Context) error {
		if pending != nil {
			ok, err := s.landed(ctx, key, kv.ModRevision, pending)
			if err != nil {
				return err
			}
			if ok {
				out = pendH
				return nil
			}
			pending, kv = nil, nil
		}
		if kv == nil {
			resp, err := s.cli.Get(ctx, key)
			if err != nil {
				return err
			}
			if len(resp.Kvs) == 0 {
				return notFound(id)
			}
			kv = resp.Kvs[0]
		}
		cur, err := s.decode(id, kv)
		if err != nil {
			return err
		}
		h, val, err := store.EncodeUpdate(cur, fn)
		if err != nil {
			return err
		}
		tr, err := s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).
			Then(clientv3.OpPut(key, string(val))).
			Else(clientv3.OpGet(key)).
			Commit()
		if err != nil {
			pending, pendH = val, h
			return err
		}
		if tr.Succeeded {
			out = h
			return nil
		}
		// Someone else wrote first; the Else branch read their record.
		kvs := tr.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 {
			return notFound(id)
		}
		kv = kvs[0]
		return errAgain
	})
	if err != nil {
		return store.Host{}, err
	}
	return out, nil
}

// landed settles a compare-and-swap against revision readRev of key whose
// outcome is unknown. Had it landed, it would be the first change to key
// after readRev (every later write compared against a newer revision), so
// that change is what to look at, not the record as it is now: another
// writer may have changed it since, on top of ours.
func (s *Store) landed(ctx context.Context, key string, readRev int64, val []byte) (bool, error) {
	resp, err := s.cli.Get(ctx, key)
	if err != nil {
		return false, err
	}
	if len(resp.Kvs) > 0 {
		if cur := resp.Kvs[0]; cur.ModRevision == readRev {
			return false, nil // untouched since we read it: ours did not land
		} else if bytes.Equal(cur.Value, val) {
			return true, nil
		}
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for wr := range s.cli.Watch(wctx, key, clientv3.WithRev(readRev+1)) {
		if err := wr.Err(); err != nil {
			if errors.Is(err, rpctypes.ErrCompacted) && len(resp.Kvs) > 0 {
				// History is gone; the record as it is now is all we have.
				return bytes.Equal(resp.Kvs[0].Value, val), nil
			}
			return false, err
		}
		if len(wr.Events) > 0 {
			ev := wr.Events[0]
			return ev.Type == clientv3.EventTypePut && bytes.Equal(ev.Kv.Value, val), nil
		}
	}
	if err := ctx.Err(); err != nil {
		return false, err
	}
	return false, errAgain // the watch ended early: ask again
}

// Delete implements store.Store.
func (s *Store) Delete(ctx context.Context, id string) error {
	key := s.hostKey(id)
	unsure := false
	return s.do(ctx, "delete host "+id, func(ctx context.Context) error {
		tr, err := s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), ">", 0)).
			Then(clientv3.OpDelete(key)).
			Commit()
		if err != nil {
			unsure = true
			return err
		}
		if !tr.Succeeded && !unsure {
			return notFound(id)
		}
		// Gone either way: deleted now, or by our earlier attempt.
		return nil
	})
}

// MasterKeyID implements store.Store.
func (s *Store) MasterKeyID(ctx context.Context, proposed string) (string, error) {
	key := s.masterKey()
	var got string
	err := s.do(ctx, "master key id", func(ctx context.Context) error {
		// Read first, also after a failed attempt: proposing is idempotent,
		// so whatever is recorded now is the answer.
		resp, err := s.cli.Get(ctx, key)
		if err != nil {
			return err
		}
		if len(resp.Kvs) > 0 {
			got = string(resp.Kvs[0].Value)
			return nil
		}
		got = ""
		if proposed == "" {
			return nil
		}
		tr, err := s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, proposed)).
			Commit()
		if err != nil {
			return err
		}
		if !tr.Succeeded {
			return errAgain // recorded meanwhile: read it
		}
		got = proposed
		return nil
	})
	return got, err
}

// Close implements store.Store: it closes the connections to the cluster.
func (s *Store) Close() error { return s.cli.Close() }
