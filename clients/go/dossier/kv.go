package dossier

import (
	"context"

	pb "dossier.internal/go/api/dossierv1"
	"google.golang.org/grpc"
)

// WriteResult is the answer of a Kv write: whether its conditions held, and the log index it
// committed at (for a retried write, the first application's).
type WriteResult struct {
	Applied bool
	// The condition that failed, when not Applied.
	FailedCondition uint32
	Index           uint64
}

// Get reads a key of a patient, linearizably. found is false when the key is absent.
func (c *Client) Get(ctx context.Context, patientID string, key []byte) (value []byte, found bool, err error) {
	return c.GetWith(ctx, patientID, key, pb.ReadConsistency_READ_CONSISTENCY_LINEARIZABLE)
}

// GetWith reads a key with the given consistency (STALE: any replica, possibly behind).
func (c *Client) GetWith(ctx context.Context, patientID string, key []byte, consistency pb.ReadConsistency) ([]byte, bool, error) {
	var answer *pb.GetResponse
	err := c.routed(ctx, patientID, func(ctx context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error {
		var err error
		answer, err = pb.NewKvClient(conn).Get(ctx, &pb.GetRequest{Route: route, Key: key, Consistency: consistency})
		return err
	})
	if err != nil {
		return nil, false, err
	}
	return answer.Value, answer.Found, nil
}

// Put sets a key of a patient.
func (c *Client) Put(ctx context.Context, patientID string, key, value []byte) (WriteResult, error) {
	return c.write(ctx, patientID, func(ctx context.Context, kv pb.KvClient, route *pb.RouteHeader, s *pb.SessionHeader) (*pb.WriteResponse, error) {
		return kv.Put(ctx, &pb.PutRequest{Route: route, Session: s, Key: key, Value: value})
	})
}

// Delete removes a key of a patient.
func (c *Client) Delete(ctx context.Context, patientID string, key []byte) (WriteResult, error) {
	return c.write(ctx, patientID, func(ctx context.Context, kv pb.KvClient, route *pb.RouteHeader, s *pb.SessionHeader) (*pb.WriteResponse, error) {
		return kv.Delete(ctx, &pb.DeleteRequest{Route: route, Session: s, Key: key})
	})
}

// CompareAndSet puts value only if the key currently holds expected (nil expected: only if
// the key is absent). Applied says whether it did.
func (c *Client) CompareAndSet(ctx context.Context, patientID string, key, expected, value []byte) (WriteResult, error) {
	return c.write(ctx, patientID, func(ctx context.Context, kv pb.KvClient, route *pb.RouteHeader, s *pb.SessionHeader) (*pb.WriteResponse, error) {
		return kv.CompareAndSet(ctx, &pb.CompareAndSetRequest{
			Route: route, Session: s, Key: key, Expected: expected, ExpectAbsent: expected == nil, Value: value,
		})
	})
}

// Batch applies operations on one patient's keys atomically if every condition holds.
func (c *Client) Batch(ctx context.Context, patientID string, conditions []*pb.Condition, operations []*pb.Operation) (WriteResult, error) {
	return c.write(ctx, patientID, func(ctx context.Context, kv pb.KvClient, route *pb.RouteHeader, s *pb.SessionHeader) (*pb.WriteResponse, error) {
		return kv.Batch(ctx, &pb.BatchRequest{Route: route, Session: s, Conditions: conditions, Operations: operations})
	})
}

// Scan reads one page of a patient's keys that start with prefix, after startAfter (nil: from
// the first); more is true when keys follow the last one returned.
func (c *Client) Scan(ctx context.Context, patientID string, prefix, startAfter []byte, limit uint32) (items []*pb.KeyValue, more bool, err error) {
	var answer *pb.ScanResponse
	err = c.routed(ctx, patientID, func(ctx context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error {
		var err error
		answer, err = pb.NewKvClient(conn).Scan(ctx, &pb.ScanRequest{
			Route: route, Prefix: prefix, StartAfter: startAfter, Limit: limit,
			Consistency: pb.ReadConsistency_READ_CONSISTENCY_LINEARIZABLE,
		})
		return err
	})
	if err != nil {
		return nil, false, err
	}
	return answer.Items, answer.More, nil
}

// write runs a Kv write under an exactly-once session of the patient's shard: every retry
// carries the same session and sequence number, so the write is applied at most once.
func (c *Client) write(ctx context.Context, patientID string, send func(context.Context, pb.KvClient, *pb.RouteHeader, *pb.SessionHeader) (*pb.WriteResponse, error)) (WriteResult, error) {
	d, err := c.ShardOf(patientID)
	if err != nil {
		return WriteResult{}, err
	}
	id, seq := c.takeSession(d.ShardId)
	s := &pb.SessionHeader{ClientSession: id, Sequence: seq}
	var answer *pb.WriteResponse
	err = c.routed(ctx, patientID, func(ctx context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error {
		var err error
		answer, err = send(ctx, pb.NewKvClient(conn), route, s)
		return err
	})
	c.settleSession(d.ShardId, s, err)
	if err != nil {
		return WriteResult{}, err
	}
	return WriteResult{Applied: answer.Applied, FailedCondition: answer.FailedCondition, Index: answer.Index}, nil
}

// settleSession returns a write's session to the idle pool once the write is over.
func (c *Client) settleSession(shard uint64, s *pb.SessionHeader, err error) {
	switch ReasonOf(err) {
	case pb.ErrorReason_ERROR_REASON_SESSION:
		// The server's table is ahead of this session (or forgot it): drop the session.
	case pb.ErrorReason_ERROR_REASON_INVALID_ARGUMENT:
		// Refused before it was proposed, on every attempt: the number was never used.
		c.returnSession(shard, s.ClientSession, s.Sequence-1)
	default:
		c.returnSession(shard, s.ClientSession, s.Sequence)
	}
}
