package dossier_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pb "dossier.internal/go/api/dossierv1"
	"dossier.internal/go/dossier"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// dossierCLI runs the `dossier` command next to the node binary and returns its output.
func dossierCLI(t *testing.T, args ...string) string {
	t.Helper()
	bin := filepath.Join(filepath.Dir(nodeBinary(t)), "dossier")
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("dossier %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// tlsCredentials trusts dir/ca.crt and presents client.USER.crt when user is not empty.
func tlsCredentials(t *testing.T, dir, user string) credentials.TransportCredentials {
	t.Helper()
	ca, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		t.Fatal("ca.crt holds no certificate")
	}
	config := &tls.Config{RootCAs: pool}
	if user != "" {
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client."+user+".crt"), filepath.Join(dir, "client."+user+".key"))
		if err != nil {
			t.Fatal(err)
		}
		config.Certificates = []tls.Certificate{cert}
	}
	return credentials.NewTLS(config)
}

// TestSecurity runs a service, a caller without identity and a clinician with a bearer token
// against 3 TLS nodes: the error model of refusals, break-the-glass, and the patient's audit
// chain verified from the protocol document alone (docs/client-protocol.md §12).
func TestSecurity(t *testing.T) {
	dir := t.TempDir()
	dossierCLI(t, "cert", "create-ca", "--certs-dir", dir)
	dossierCLI(t, "cert", "create-node", "127.0.0.1", "--certs-dir", dir)
	dossierCLI(t, "cert", "create-client", "ward-app", "--role", "service", "--certs-dir", dir)
	dossierCLI(t, "cert", "create-client", "dba", "--role", "admin", "--certs-dir", dir)
	dossierCLI(t, "token", "create-issuer", "--certs-dir", dir)
	token := strings.TrimSpace(dossierCLI(t, "--certs-dir", dir, "token", "issue", "dr-other",
		"--role", "clinician", "--practitioner", "https://example.org/practitioners|12345"))
	cluster := startClusterWith(t, 3, 2, []string{
		"--certs-dir", dir, "--token-jwks", filepath.Join(dir, "jwks.json"),
		"--token-issuer", "https://idp.dossier.local", "--token-audience", "dossier",
	}, grpc.WithTransportCredentials(tlsCredentials(t, dir, "dba")))
	seeds := []string{cluster.nodes[0].grpc, cluster.nodes[1].grpc}
	ctx := context.Background()
	connect := func(options ...grpc.DialOption) (*dossier.Client, error) {
		config := dossier.DefaultConfig(seeds...)
		config.DialOptions = options
		return dossier.Connect(ctx, config)
	}

	service, err := connect(grpc.WithTransportCredentials(tlsCredentials(t, dir, "ward-app")))
	if err != nil {
		t.Fatalf("the service connects: %v", err)
	}
	defer service.Close()
	id := "go-secure-1"
	patient := &pb.Resource{
		Meta: &pb.Meta{Id: id, PatientId: id},
		Kind: &pb.Resource_Patient{Patient: &pb.Patient{Names: []*pb.HumanName{{Family: "Claes"}}}},
	}
	if w, err := service.CreatePatient(ctx, patient, dossier.WriteOptions{}); err != nil || !dossier.Applied(w) {
		t.Fatalf("the service creates a patient: %v %v", w, err)
	}

	// No certificate and no token: UNAUTHENTICATED, with its reason.
	conn, err := grpc.Dial(seeds[0], grpc.WithTransportCredentials(tlsCredentials(t, dir, "")))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = pb.NewAdminClient(conn).GetClusterMap(ctx, &pb.ClusterMapRequest{})
	if status.Code(err) != codes.Unauthenticated || dossier.DetailOf(err).GetReason() != pb.ErrorReason_ERROR_REASON_UNAUTHENTICATED {
		t.Fatalf("want UNAUTHENTICATED without identity, got %v", err)
	}

	// A clinician with no care relationship: refused, then served on breaking the glass.
	clinician, err := connect(
		grpc.WithTransportCredentials(tlsCredentials(t, dir, "")),
		grpc.WithPerRPCCredentials(dossier.BearerToken(token)))
	if err != nil {
		t.Fatalf("the clinician connects: %v", err)
	}
	defer clinician.Close()
	_, err = clinician.ReadRecord(ctx, id, pb.ResourceType_RESOURCE_TYPE_PATIENT, id)
	if dossier.ReasonOf(err) != pb.ErrorReason_ERROR_REASON_PERMISSION_DENIED {
		t.Fatalf("want PERMISSION_DENIED without a care relationship, got %v", err)
	}
	reason := "unconscious patient in the emergency room"
	got, err := clinician.ReadRecord(dossier.WithBreakGlass(ctx, reason), id, pb.ResourceType_RESOURCE_TYPE_PATIENT, id)
	if err != nil || got == nil {
		t.Fatalf("breaking the glass: %v %v", got, err)
	}

	// The patient's audit chain, read by the service and verified link by link. A read's event
	// reaches the chain from its serving node's journal: the node answering moves its own
	// first, another's follow within moments. Each read of the log is on it too.
	var log *pb.AccessLogResponse
	var accesses []*pb.AuditEvent
	for wait := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		log, err = service.AccessLog(ctx, id, 0, 0)
		if err != nil {
			t.Fatalf("access log: %v", err)
		}
		accesses = accesses[:0]
		prev := make([]byte, 32)
		for i, e := range log.Entries {
			if e.Seq != uint64(i+1) {
				t.Fatalf("entry %d has seq %d", i, e.Seq)
			}
			h := sha256.New()
			h.Write([]byte("dossier-chain-v1"))
			h.Write(prev)
			_ = binary.Write(h, binary.BigEndian, e.Seq)
			h.Write(e.Event)
			if sum := h.Sum(nil); !bytes.Equal(sum, e.Hash) {
				t.Fatalf("entry %d does not link", e.Seq)
			}
			prev = e.Hash
			event := &pb.AuditEvent{}
			if err := proto.Unmarshal(e.Event, event); err != nil {
				t.Fatal(err)
			}
			if event.Action != pb.AuditAction_AUDIT_ACTION_ACCESS_LOG {
				accesses = append(accesses, event)
			}
		}
		if log.More || log.HeadSeq != uint64(len(log.Entries)) || !bytes.Equal(log.HeadHash, prev) {
			t.Fatalf("the chain does not end at its head: %d entries, head %d", len(log.Entries), log.HeadSeq)
		}
		if len(accesses) >= 2 || time.Now().After(wait) {
			break
		}
	}
	// Create by the service, then the clinician's break-the-glass read (the refusal left none).
	if len(accesses) != 2 {
		t.Fatalf("want the create and the break-the-glass read, got %d accesses", len(accesses))
	}
	last := accesses[1]
	if last.Actor != "dr-other" || last.Ground != pb.AuditGround_AUDIT_GROUND_BREAK_GLASS || last.Reason != reason {
		t.Fatalf("want the break-the-glass read last, got %v", last)
	}
}
