package dossier

import (
	"context"
	"errors"
	"fmt"
	"time"

	pb "dossier.internal/go/api/dossierv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// attempt is what one try against one node decided.
type attempt int

const (
	retry attempt = iota
	fail
)

// routed runs call against the patient's shard until it succeeds, fails for good, or the
// deadline passes (docs/client-protocol.md, "Retries"): it follows leader hints, refreshes the
// map on STALE_EPOCH and SHARD_NOT_FOUND, rotates replicas on unreachable or unavailable nodes
// and backs off between attempts.
func (c *Client) routed(ctx context.Context, patientID string, call func(ctx context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error) error {
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	backoff := c.config.BackoffMin
	rotate := 0
	var last error
	for attempts := 1; ; attempts++ {
		if err := ctx.Err(); err != nil {
			return giveUp(err, attempts-1, last)
		}
		d, err := c.ShardOf(patientID)
		if err != nil {
			return err
		}
		if len(d.Replicas) == 0 {
			return clientError(codes.FailedPrecondition, "shard %d has no replicas in the map", d.ShardId)
		}
		target := d.Replicas[rotate%len(d.Replicas)]
		c.mu.Lock()
		if leader, ok := c.leaders[d.ShardId]; ok && rotate == 0 && contains(d.Replicas, leader) {
			target = leader
		}
		c.mu.Unlock()
		addr, ok := c.address(target)
		if !ok {
			return clientError(codes.FailedPrecondition, "node %d of shard %d is not in the map", target, d.ShardId)
		}
		conn, err := c.Conn(addr)
		if err != nil {
			return err
		}
		route := &pb.RouteHeader{ShardId: d.ShardId, Epoch: d.Epoch, PatientId: patientID}
		attemptCtx, cancelAttempt := context.WithTimeout(ctx, c.config.AttemptTimeout)
		err = call(attemptCtx, conn, route)
		cancelAttempt()
		if err == nil {
			c.mu.Lock()
			c.leaders[d.ShardId] = target
			c.mu.Unlock()
			return nil
		}
		if c.classify(ctx, d, err, &rotate) == fail {
			st := status.Convert(err)
			return &Error{Code: st.Code(), Detail: DetailOf(err), Message: st.Message(), Attempts: attempts}
		}
		last = err
		pause := backoff
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < pause {
			pause = time.Until(dl)
		}
		select {
		case <-time.After(pause):
		case <-ctx.Done():
		}
		if backoff *= 2; backoff > c.config.BackoffMax {
			backoff = c.config.BackoffMax
		}
	}
}

// classify decides what one failed attempt means (docs/client-protocol.md, "Error reasons").
func (c *Client) classify(ctx context.Context, d *pb.ShardDescriptor, err error, rotate *int) attempt {
	detail := DetailOf(err)
	if detail == nil {
		// No detail: the transport failed (node down, connection refused, attempt timeout).
		if status.Code(err) == codes.Canceled && ctx.Err() == nil {
			return fail
		}
		*rotate++
		return retry
	}
	switch detail.Reason {
	case pb.ErrorReason_ERROR_REASON_NOT_LEADER:
		c.mu.Lock()
		if detail.LeaderHintNodeId != 0 {
			c.leaders[d.ShardId] = detail.LeaderHintNodeId
			*rotate = 0
		} else {
			delete(c.leaders, d.ShardId)
			*rotate++
		}
		c.mu.Unlock()
		return retry
	case pb.ErrorReason_ERROR_REASON_STALE_EPOCH, pb.ErrorReason_ERROR_REASON_SHARD_NOT_FOUND:
		// The map moved: fetch it again (a failed refresh is retried on the next attempt).
		_, _ = c.RefreshMap(ctx)
		*rotate++
		return retry
	case pb.ErrorReason_ERROR_REASON_RESOURCE_EXHAUSTED, pb.ErrorReason_ERROR_REASON_DEADLINE:
		return retry
	case pb.ErrorReason_ERROR_REASON_UNAVAILABLE, pb.ErrorReason_ERROR_REASON_UNSPECIFIED:
		*rotate++
		return retry
	default:
		// INVALID_ARGUMENT, SESSION, CLUSTER_STATE, INTERNAL, UNAUTHENTICATED, PERMISSION_DENIED:
		// the answer is final.
		return fail
	}
}

func (c *Client) withDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, c.config.Deadline)
}

func giveUp(ctxErr error, attempts int, last error) error {
	code := codes.DeadlineExceeded
	if errors.Is(ctxErr, context.Canceled) {
		code = codes.Canceled
	}
	message := "the deadline passed before the first attempt"
	if last != nil {
		message = fmt.Sprintf("the deadline passed; last attempt: %v", last)
	}
	return &Error{Code: code, Detail: DetailOf(last), Message: message, Attempts: attempts}
}

func contains(ids []uint64, id uint64) bool {
	for _, v := range ids {
		if v == id {
			return true
		}
	}
	return false
}
