package dossier_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	pb "dossier.internal/go/api/dossierv1"
	"google.golang.org/grpc"
)

// testCluster is real dossier-node processes on loopback, in a temporary directory.
type testCluster struct {
	t     testing.TB
	bin   string
	dir   string
	nodes []*testNode
	// Extra flags of every node (TLS, tokens).
	args []string
}

type testNode struct {
	id         uint64
	grpc, http string
	data       string
	cmd        *exec.Cmd
}

// nodeBinary is DOSSIER_NODE_BIN, or the workspace's debug build.
func nodeBinary(t testing.TB) string {
	bin := os.Getenv("DOSSIER_NODE_BIN")
	if bin == "" {
		bin = filepath.Join("..", "..", "..", "target", "debug", "dossier-node")
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		t.Fatalf("node binary path %q: %v", bin, err)
	}
	if _, err := os.Stat(abs); err != nil {
		t.Fatalf("dossier-node not found at %s (build it with `cargo build -p dossier-node`, or set DOSSIER_NODE_BIN): %v", abs, err)
	}
	return abs
}

func freePort(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("no free port: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startCluster starts n nodes and initialises a cluster of `shards` shards of 3 replicas.
func startCluster(t testing.TB, n int, shards uint32) *testCluster {
	t.Helper()
	return startClusterWith(t, n, shards, []string{"--insecure"}, grpc.WithInsecure())
}

// startClusterWith starts n nodes with `args` and initialises the cluster over `dial`.
func startClusterWith(t testing.TB, n int, shards uint32, args []string, dial grpc.DialOption) *testCluster {
	t.Helper()
	c := &testCluster{t: t, bin: nodeBinary(t), dir: t.TempDir(), args: args}
	for i := 1; i <= n; i++ {
		node := &testNode{
			id:   uint64(i),
			grpc: freePort(t),
			http: freePort(t),
			data: filepath.Join(c.dir, fmt.Sprintf("n%d", i)),
		}
		c.nodes = append(c.nodes, node)
		c.start(node)
	}
	t.Cleanup(c.stop)
	var infos []*pb.NodeInfo
	for _, node := range c.nodes {
		infos = append(infos, &pb.NodeInfo{NodeId: node.id, Address: node.grpc})
	}
	deadline := time.Now().Add(60 * time.Second)
	target := c.nodes[0].grpc
	for {
		conn, err := grpc.Dial(target, dial)
		if err != nil {
			t.Fatalf("dial %s: %v", target, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		_, err = pb.NewAdminClient(conn).InitCluster(ctx, &pb.InitClusterRequest{Nodes: infos, Shards: shards, Replicas: 3})
		cancel()
		conn.Close()
		if err == nil {
			return c
		}
		if time.Now().After(deadline) {
			c.dumpLogs()
			t.Fatalf("cluster init did not complete: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *testCluster) start(node *testNode) {
	if err := os.MkdirAll(node.data, 0o755); err != nil {
		c.t.Fatal(err)
	}
	log, err := os.OpenFile(filepath.Join(node.data, "node.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	defer log.Close()
	args := []string{
		"--node-id", strconv.FormatUint(node.id, 10),
		"--listen", node.grpc, "--http-listen", node.http,
		"--data-dir", node.data, "--no-auto-init",
	}
	node.cmd = exec.Command(c.bin, append(args, c.args...)...)
	node.cmd.Stdout, node.cmd.Stderr = log, log
	if err := node.cmd.Start(); err != nil {
		c.t.Fatalf("start %s: %v", c.bin, err)
	}
}

// kill SIGKILLs a node: it stops at once, mid-write.
func (c *testCluster) kill(node *testNode) {
	if node.cmd != nil {
		_ = node.cmd.Process.Kill()
		_, _ = node.cmd.Process.Wait()
		node.cmd = nil
	}
}

func (c *testCluster) stop() {
	for _, node := range c.nodes {
		if node.cmd != nil {
			_ = node.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, node := range c.nodes {
		if node.cmd == nil {
			continue
		}
		done := make(chan struct{})
		go func(cmd *exec.Cmd) { _, _ = cmd.Process.Wait(); close(done) }(node.cmd)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			c.kill(node)
		}
		node.cmd = nil
	}
	if c.t.Failed() {
		c.dumpLogs()
	}
}

func (c *testCluster) dumpLogs() {
	for _, node := range c.nodes {
		data, _ := os.ReadFile(filepath.Join(node.data, "node.log"))
		if len(data) > 6000 {
			data = data[len(data)-6000:]
		}
		c.t.Logf("--- node %d log (tail) ---\n%s", node.id, data)
	}
}

func (c *testCluster) seeds() []string {
	var seeds []string
	for _, node := range c.nodes {
		seeds = append(seeds, node.grpc)
	}
	return seeds
}

// leaderOf asks every running node which replica leads the shard; the highest term wins.
func (c *testCluster) leaderOf(shard uint64) *testNode {
	var best *testNode
	var bestTerm uint64
	for _, node := range c.nodes {
		if node.cmd == nil {
			continue
		}
		conn, err := grpc.Dial(node.grpc, grpc.WithInsecure())
		if err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		status, err := pb.NewAdminClient(conn).NodeStatus(ctx, &pb.NodeStatusRequest{})
		cancel()
		conn.Close()
		if err != nil {
			continue
		}
		for _, s := range status.Shards {
			if s.ShardId == shard && s.Role == "leader" && s.Term >= bestTerm {
				best, bestTerm = node, s.Term
			}
		}
	}
	return best
}
