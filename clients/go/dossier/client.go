package dossier

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	pb "dossier.internal/go/api/dossierv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

// Config says how the client reaches the cluster and how long it keeps trying.
type Config struct {
	// host:port of a few nodes; any one that answers gives the map.
	Seeds []string
	// Deadline of one call to one node.
	AttemptTimeout time.Duration
	// Deadline of a whole request, retries included, when the context has none.
	Deadline time.Duration
	// First and largest pause between retries (doubling).
	BackoffMin, BackoffMax time.Duration
	// Largest answer accepted (Everything and Bundle messages, scans).
	MaxReceiveBytes int
	// Extra dial options (TLS credentials, interceptors). Without any, connections are
	// plaintext.
	DialOptions []grpc.DialOption
}

// DefaultConfig is the configuration of the Rust client: 2 s per attempt, 10 s per request,
// backoff from 10 ms doubling to 100 ms.
func DefaultConfig(seeds ...string) Config {
	return Config{
		Seeds:           seeds,
		AttemptTimeout:  2 * time.Second,
		Deadline:        10 * time.Second,
		BackoffMin:      10 * time.Millisecond,
		BackoffMax:      100 * time.Millisecond,
		MaxReceiveBytes: 80 << 20,
	}
}

// Client is a connection to a Dossier cluster, safe for concurrent use; share one per process.
type Client struct {
	config Config

	mu       sync.Mutex
	clusters *pb.ClusterMap
	conns    map[string]*grpc.ClientConn
	// The leader each shard last answered from (or hinted).
	leaders map[uint64]uint64
	// Idle exactly-once sessions per shard: the server keeps a session table per shard, so a
	// session's sequence numbers are per shard too.
	sessions map[uint64][]session
}

type session struct {
	id       uint64
	lastUsed uint64
}

// Connect fetches the cluster map through the seeds.
func Connect(ctx context.Context, config Config) (*Client, error) {
	if len(config.Seeds) == 0 {
		return nil, clientError(codes.InvalidArgument, "no seed address given")
	}
	defaults := DefaultConfig()
	if config.AttemptTimeout <= 0 {
		config.AttemptTimeout = defaults.AttemptTimeout
	}
	if config.Deadline <= 0 {
		config.Deadline = defaults.Deadline
	}
	if config.BackoffMin <= 0 {
		config.BackoffMin = defaults.BackoffMin
	}
	if config.BackoffMax < config.BackoffMin {
		config.BackoffMax = defaults.BackoffMax
	}
	if config.MaxReceiveBytes <= 0 {
		config.MaxReceiveBytes = defaults.MaxReceiveBytes
	}
	c := &Client{
		config:   config,
		conns:    map[string]*grpc.ClientConn{},
		leaders:  map[uint64]uint64{},
		sessions: map[uint64][]session{},
	}
	if _, err := c.RefreshMap(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Close closes every connection.
func (c *Client) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for addr, conn := range c.conns {
		_ = conn.Close()
		delete(c.conns, addr)
	}
}

// ClusterMap is the cached cluster map (do not modify it).
func (c *Client) ClusterMap() *pb.ClusterMap {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.clusters
}

// Conn is the connection to a node address, opened on first use (for the generated clients,
// e.g. pb.NewAdminClient(conn)).
func (c *Client) Conn(addr string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if conn, ok := c.conns[addr]; ok {
		return conn, nil
	}
	options := append([]grpc.DialOption{
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(c.config.MaxReceiveBytes)),
	}, c.config.DialOptions...)
	if len(c.config.DialOptions) == 0 {
		options = append(options, grpc.WithInsecure())
	}
	// Non-blocking: a node that is down fails the call (UNAVAILABLE), which rotates replicas.
	conn, err := grpc.Dial(addr, options...)
	if err != nil {
		return nil, clientError(codes.InvalidArgument, "address %q: %v", addr, err)
	}
	c.conns[addr] = conn
	return conn, nil
}

// RefreshMap fetches the map from any node that answers: the seeds first, then the nodes of
// the cached map.
func (c *Client) RefreshMap(ctx context.Context) (*pb.ClusterMap, error) {
	candidates := append([]string(nil), c.config.Seeds...)
	if m := c.ClusterMap(); m != nil {
		for _, n := range m.Nodes {
			candidates = append(candidates, n.Address)
		}
	}
	last := "no candidates"
	for _, addr := range candidates {
		conn, err := c.Conn(addr)
		if err != nil {
			return nil, err
		}
		attempt, cancel := context.WithTimeout(ctx, c.config.AttemptTimeout)
		m, err := pb.NewAdminClient(conn).GetClusterMap(attempt, &pb.ClusterMapRequest{})
		cancel()
		if err != nil {
			last = fmt.Sprintf("%s: %v", addr, err)
			continue
		}
		if len(m.Shards) == 0 {
			last = fmt.Sprintf("%s: the map has no shards", addr)
			continue
		}
		c.mu.Lock()
		if c.clusters != nil && m.Version < c.clusters.Version {
			// A node that fell behind (or left the cluster): the map never goes back.
			c.mu.Unlock()
			last = fmt.Sprintf("%s: map version %d is older than %d", addr, m.Version, c.clusters.Version)
			continue
		}
		c.clusters = m
		c.mu.Unlock()
		return m, nil
	}
	return nil, clientError(codes.Unavailable, "no node gave the cluster map: %s", last)
}

// ShardOf is the descriptor of the shard holding the patient (or index key), by the cached map.
func (c *Client) ShardOf(patientID string) (*pb.ShardDescriptor, error) {
	m := c.ClusterMap()
	if m == nil {
		return nil, clientError(codes.FailedPrecondition, "no cluster map")
	}
	h := PatientHash(patientID)
	for _, d := range m.Shards {
		if h >= d.HashLo && (d.HashHiMax || h < d.HashHi) {
			return d, nil
		}
	}
	return nil, clientError(codes.FailedPrecondition, "no shard covers patient %q (hash %d)", patientID, h)
}

func (c *Client) address(nodeID uint64) (string, bool) {
	m := c.ClusterMap()
	if m == nil {
		return "", false
	}
	for _, n := range m.Nodes {
		if n.NodeId == nodeID {
			return n.Address, true
		}
	}
	return "", false
}

func (c *Client) takeSession(shard uint64) (uint64, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	idle := c.sessions[shard]
	if n := len(idle); n > 0 {
		s := idle[n-1]
		c.sessions[shard] = idle[:n-1]
		return s.id, s.lastUsed + 1
	}
	return randomNonZero(), 1
}

func (c *Client) returnSession(shard, id, lastUsed uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sessions[shard] = append(c.sessions[shard], session{id: id, lastUsed: lastUsed})
}

var fallbackSeed = uint64(time.Now().UnixNano())

func randomNonZero() uint64 {
	var b [8]byte
	for {
		var v uint64
		if _, err := rand.Read(b[:]); err == nil {
			v = binary.LittleEndian.Uint64(b[:])
		} else {
			// No system randomness: a clock-seeded sequence still gives distinct ids.
			v = splitmix64(atomic.AddUint64(&fallbackSeed, 0x9E3779B97F4A7C15))
		}
		if v != 0 {
			return v
		}
	}
}

func splitmix64(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
	z = (z ^ (z >> 27)) * 0x94D049BB133111EB
	return z ^ (z >> 31)
}

// NewRequestID draws a records write's exactly-once key: 16 random bytes, not all zero.
func NewRequestID() []byte {
	id := make([]byte, 16)
	binary.LittleEndian.PutUint64(id[:8], randomNonZero())
	binary.LittleEndian.PutUint64(id[8:], randomNonZero())
	return id
}
