package dossier

import (
	"context"
	"io"
	"sync"

	pb "dossier.internal/go/api/dossierv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Bundle collects independent Kv requests and sends them as one Kv.Bundle per node
// (docs/client-protocol.md, "Bundles"): each is routed, served and answered as if sent alone,
// nothing is atomic across them. Writes carry their own exactly-once session. An item refused
// for routing (NOT_LEADER, STALE_EPOCH, ...) or overload is retried alone through the normal
// path; its answer is the retry's.
type Bundle struct {
	c     *Client
	items []bundleItem
}

type bundleItem struct {
	patientID string
	get       *pb.GetRequest
	// Builds the write for a route and session (nil for gets).
	write  func(*pb.RouteHeader, *pb.SessionHeader) *pb.BundleItem
	resend func(ctx context.Context) (*pb.BundleAnswer, error)
}

// BundleAnswer is one item's answer: Get or Write, or Err.
type BundleAnswer struct {
	Found bool
	Value []byte
	Write WriteResult
	Err   error
}

// NewBundle starts an empty bundle.
func (c *Client) NewBundle() *Bundle { return &Bundle{c: c} }

// Get adds a linearizable read.
func (b *Bundle) Get(patientID string, key []byte) {
	b.items = append(b.items, bundleItem{
		patientID: patientID,
		get:       &pb.GetRequest{Key: key, Consistency: pb.ReadConsistency_READ_CONSISTENCY_LINEARIZABLE},
		resend: func(ctx context.Context) (*pb.BundleAnswer, error) {
			v, found, err := b.c.Get(ctx, patientID, key)
			return &pb.BundleAnswer{Answer: &pb.BundleAnswer_Get{Get: &pb.GetResponse{Found: found, Value: v}}}, err
		},
	})
}

// Put adds a write of one key.
func (b *Bundle) Put(patientID string, key, value []byte) {
	b.items = append(b.items, bundleItem{
		patientID: patientID,
		write: func(r *pb.RouteHeader, s *pb.SessionHeader) *pb.BundleItem {
			return &pb.BundleItem{Request: &pb.BundleItem_Put{Put: &pb.PutRequest{Route: r, Session: s, Key: key, Value: value}}}
		},
		resend: func(ctx context.Context) (*pb.BundleAnswer, error) {
			w, err := b.c.Put(ctx, patientID, key, value)
			return writeAnswer(w), err
		},
	})
}

// Len is the number of items added.
func (b *Bundle) Len() int { return len(b.items) }

func writeAnswer(w WriteResult) *pb.BundleAnswer {
	return &pb.BundleAnswer{Answer: &pb.BundleAnswer_Write{Write: &pb.WriteResponse{
		Applied: w.Applied, FailedCondition: w.FailedCondition, Index: w.Index,
	}}}
}

// Send sends the items, one Kv.Bundle per node (to each shard's last known leader), and returns
// their answers in the order they were added. The error is for the bundle as a whole (no map);
// each item's own failure is in its answer.
func (b *Bundle) Send(ctx context.Context) ([]BundleAnswer, error) {
	ctx, cancel := b.c.withDeadline(ctx)
	defer cancel()
	answers := make([]BundleAnswer, len(b.items))
	type slot struct {
		index   int
		shard   uint64
		session *pb.SessionHeader
	}
	perNode := map[string][]slot{}
	requests := map[string][]*pb.BundleItem{}
	for i, item := range b.items {
		d, err := b.c.ShardOf(item.patientID)
		if err != nil {
			return nil, err
		}
		target := d.Replicas[0]
		b.c.mu.Lock()
		if leader, ok := b.c.leaders[d.ShardId]; ok && contains(d.Replicas, leader) {
			target = leader
		}
		b.c.mu.Unlock()
		addr, ok := b.c.address(target)
		if !ok {
			return nil, clientError(codes.FailedPrecondition, "node %d is not in the map", target)
		}
		route := &pb.RouteHeader{ShardId: d.ShardId, Epoch: d.Epoch, PatientId: item.patientID}
		s := slot{index: i, shard: d.ShardId}
		var request *pb.BundleItem
		if item.get != nil {
			get := &pb.GetRequest{Route: route, Key: item.get.Key, Consistency: item.get.Consistency}
			request = &pb.BundleItem{Request: &pb.BundleItem_Get{Get: get}}
		} else {
			id, seq := b.c.takeSession(d.ShardId)
			s.session = &pb.SessionHeader{ClientSession: id, Sequence: seq}
			request = item.write(route, s.session)
		}
		perNode[addr] = append(perNode[addr], s)
		requests[addr] = append(requests[addr], request)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	for addr := range perNode {
		addr := addr
		wg.Add(1)
		go func() {
			defer wg.Done()
			got := b.c.sendBundle(ctx, addr, requests[addr])
			mu.Lock()
			defer mu.Unlock()
			for k, s := range perNode[addr] {
				answers[s.index] = b.finish(ctx, s.index, s.shard, s.session, got[k])
			}
		}()
	}
	wg.Wait()
	return answers, nil
}

// sendBundle sends one bundle to one node; an item left unanswered (the stream broke) gets the
// stream's error.
func (c *Client) sendBundle(ctx context.Context, addr string, items []*pb.BundleItem) []*pb.BundleAnswer {
	got := make([]*pb.BundleAnswer, len(items))
	fill := func(err error) {
		st := status.Convert(err)
		for k := range got {
			if got[k] == nil {
				got[k] = &pb.BundleAnswer{Answer: &pb.BundleAnswer_Error{Error: &pb.ItemError{
					Code: int32(st.Code()), Message: st.Message(), Detail: DetailOf(err),
				}}}
			}
		}
	}
	conn, err := c.Conn(addr)
	if err != nil {
		fill(err)
		return got
	}
	attempt, cancel := context.WithTimeout(ctx, c.config.AttemptTimeout)
	defer cancel()
	stream, err := pb.NewKvClient(conn).Bundle(attempt, &pb.BundleRequest{Items: items})
	if err != nil {
		fill(err)
		return got
	}
	for {
		message, err := stream.Recv()
		if err == io.EOF {
			fill(status.Error(codes.Internal, "the bundle ended without answering this item"))
			return got
		}
		if err != nil {
			fill(err)
			return got
		}
		for _, a := range message.Answers {
			if int(a.Item) < len(got) {
				got[a.Item] = a
			}
		}
	}
}

// finish turns one item's answer into its result: retried alone (same session) when the
// server says to retry, else final.
func (b *Bundle) finish(ctx context.Context, index int, shard uint64, s *pb.SessionHeader, a *pb.BundleAnswer) BundleAnswer {
	if failure := a.GetError(); failure != nil && retryable(failure.Detail) {
		item := b.items[index]
		if s != nil {
			// The retry goes through the normal path with this item's session and number.
			var w *pb.WriteResponse
			err := b.c.routed(ctx, item.patientID, func(ctx context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error {
				var err error
				w, err = sendWrite(ctx, conn, item.write(route, s))
				return err
			})
			b.c.settleSession(shard, s, err)
			if err != nil {
				return BundleAnswer{Err: err}
			}
			return BundleAnswer{Write: WriteResult{Applied: w.Applied, FailedCondition: w.FailedCondition, Index: w.Index}}
		}
		a, err := item.resend(ctx)
		if err != nil {
			return BundleAnswer{Err: err}
		}
		return BundleAnswer{Found: a.GetGet().GetFound(), Value: a.GetGet().GetValue()}
	}
	if s != nil {
		var err error
		if failure := a.GetError(); failure != nil {
			err = itemError(failure)
		}
		b.c.settleSession(shard, s, err)
	}
	switch {
	case a.GetError() != nil:
		return BundleAnswer{Err: itemError(a.GetError())}
	case a.GetWrite() != nil:
		w := a.GetWrite()
		return BundleAnswer{Write: WriteResult{Applied: w.Applied, FailedCondition: w.FailedCondition, Index: w.Index}}
	default:
		return BundleAnswer{Found: a.GetGet().GetFound(), Value: a.GetGet().GetValue()}
	}
}

func itemError(e *pb.ItemError) *Error {
	return &Error{Code: codes.Code(e.Code), Detail: e.Detail, Message: e.Message, Attempts: 1}
}

// retryable: the reasons the normal path retries (a missing detail is a transport failure).
func retryable(d *pb.ErrorDetail) bool {
	if d == nil {
		return true
	}
	switch d.Reason {
	case pb.ErrorReason_ERROR_REASON_INVALID_ARGUMENT, pb.ErrorReason_ERROR_REASON_SESSION,
		pb.ErrorReason_ERROR_REASON_CLUSTER_STATE, pb.ErrorReason_ERROR_REASON_INTERNAL,
		pb.ErrorReason_ERROR_REASON_UNAUTHENTICATED, pb.ErrorReason_ERROR_REASON_PERMISSION_DENIED:
		return false
	}
	return true
}

// sendWrite sends a write item as the unary call it stands for.
func sendWrite(ctx context.Context, conn *grpc.ClientConn, item *pb.BundleItem) (*pb.WriteResponse, error) {
	kv := pb.NewKvClient(conn)
	switch r := item.Request.(type) {
	case *pb.BundleItem_Put:
		return kv.Put(ctx, r.Put)
	case *pb.BundleItem_Delete:
		return kv.Delete(ctx, r.Delete)
	case *pb.BundleItem_CompareAndSet:
		return kv.CompareAndSet(ctx, r.CompareAndSet)
	case *pb.BundleItem_Batch:
		return kv.Batch(ctx, r.Batch)
	default:
		return nil, status.Error(codes.InvalidArgument, "not a write")
	}
}
