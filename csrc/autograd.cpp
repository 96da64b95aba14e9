// Autograd of fused_loss: the forward already computed d loss / d features, so backward only scales
// it by grad_output (per row for reduction none). Registered for every backend at once.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "fused_loss_checks.h"

namespace haframe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> call_fused_loss(const at::Tensor& features, const at::Tensor& weight,
                                                   const at::Tensor& target, const OptTensor& similarity,
                                                   const OptTensor& gram, double alpha, int64_t ignore_index,
                                                   int64_t reduction, bool need_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("haframe_ext::fused_loss", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const OptTensor&,
                                                                 const OptTensor&, double, int64_t, int64_t, bool)>();
  return op.call(features, weight, target, similarity, gram, alpha, ignore_index, reduction, need_grad);
}

// A tensor holding real data: not a fake, functional or traced one (reading its value would guard on data).
bool is_plain(const at::Tensor& t) {
  const c10::DispatchKeySet ks = t.key_set();
  return !ks.has(c10::DispatchKey::Python) && !ks.has(c10::DispatchKey::Functionalize) &&
         !ks.has(c10::DispatchKey::PythonTLSSnapshot);
}

class FusedLossFunction : public torch::autograd::Function<FusedLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, const at::Tensor& weight,
                               const at::Tensor& target, const OptTensor& similarity, const OptTensor& gram,
                               double alpha, int64_t ignore_index, int64_t reduction, bool need_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] =
        call_fused_loss(features, weight, target, similarity, gram, alpha, ignore_index, reduction, need_grad);
    ctx->save_for_backward({grad});
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({grad});
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "haframe_ext fused loss: double backward (create_graph=True) is not supported, because the "
                "gradient is computed in the forward pass; use haframe_loss(..., backend='reference')");
    const at::Tensor grad = ctx->get_saved_variables()[0];  // [B, d]
    TORCH_CHECK(grad.dim() == 2, "haframe_ext fused loss: the forward ran with need_grad=false; nothing to backpropagate");
    const at::Tensor& go = grad_outputs[0];  // [B] or []
    at::Tensor g;
    const bool reduced = ctx->saved_data["reduction"].toInt() != kNone;
    if (go.defined() && reduced && go.dim() == 0 && go.device().is_cpu() && is_plain(go) &&
        go.item<double>() == 1.0) {
      g = grad;  // loss.backward() on the CPU: grad * 1 is grad, bit for bit (autograd clones it if it is shared)
    } else if (go.defined()) {
      g = (grad * (reduced ? go : go.unsqueeze(1))).to(grad.scalar_type());
    }
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> fused_loss_autograd(const at::Tensor& features, const at::Tensor& weight,
                                                       const at::Tensor& target, const OptTensor& similarity,
                                                       const OptTensor& gram, double alpha, int64_t ignore_index,
                                                       int64_t reduction, bool need_grad) {
  auto out = FusedLossFunction::apply(features, weight, target, similarity, gram, alpha, ignore_index, reduction,
                                      need_grad);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace haframe

TORCH_LIBRARY_IMPL(haframe_ext, Autograd, m) { m.impl("fused_loss", &haframe::fused_loss_autograd); }
